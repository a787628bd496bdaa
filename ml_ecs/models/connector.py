"""Connector: masked fusion of modality embeddings -> fused representation z -> soft prompt."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Connector(nnx.Module):
  """Per-modality projection, mean over the present modalities only, LayerNorm,
  Linear -> z, MLP -> P soft-prompt tokens of the backbone's width."""

  def __init__(self, modalities: Sequence[str], d_in: int, d_fuse: int, d_z: int,
               prompt_len: int, d_model: int, *, rngs: nnx.Rngs):
    self.modalities = tuple(modalities)
    self.proj = nnx.Dict({m: nnx.Linear(d_in, d_fuse, rngs=rngs) for m in self.modalities})
    self.norm = nnx.LayerNorm(d_fuse, rngs=rngs)
    self.to_z = nnx.Linear(d_fuse, d_z, rngs=rngs)
    self.prompt_hidden = nnx.Linear(d_z, d_model, rngs=rngs)
    self.prompt_out = nnx.Linear(d_model, prompt_len * d_model, rngs=rngs)
    self.prompt_len, self.d_model = prompt_len, d_model

  def project(self, emb: dict[str, jax.Array]) -> jax.Array:
    """Projected modality embeddings [B, K, d_fuse] in this connector's modality order."""
    return jnp.stack([self.proj[m](emb[m]) for m in self.modalities], axis=1)

  def fuse(self, projected: jax.Array, mask: jax.Array) -> jax.Array:
    """z [B, d_z] from projected [B,K,d_fuse] and mask [B,K]; missing modalities never enter."""
    present = mask.astype(bool)[..., None]
    total = jnp.where(present, projected, 0.0).sum(axis=1)
    fused = total / jnp.maximum(present.sum(axis=1), 1).astype(projected.dtype)
    return self.to_z(self.norm(fused))

  def prompt(self, z: jax.Array) -> jax.Array:
    """Soft prompt [B, P, d_model] from z."""
    h = self.prompt_out(jax.nn.gelu(self.prompt_hidden(z)))
    return h.reshape(z.shape[0], self.prompt_len, self.d_model)
