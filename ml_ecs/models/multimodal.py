"""The node model M = {E, C, B}: modality encoders, connector and LoRA backbone.

Between encoders and connector sits one low-rank *modality adapter* per
modality of the whole federation (``SharedLoRA``): these are the
modality-specific shared parameters (``ModalityLoRA``, tagged with their
modality) that MMA averages only over the clients that have the modality. Every node carries an adapter for every modality so
that the shared part has one structure on all clients; adapters of modalities a
node lacks receive no gradient and zero aggregation weight.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from ml_ecs.models.connector import Connector
from ml_ecs.models.decoder import DecoderLM
from ml_ecs.models.encoders import make_encoder
from ml_ecs.models.variables import ModalityLoRA


class ModalityAdapter(nnx.Module):
  """e + (alpha / r) e A B with B = 0 at init."""

  def __init__(self, modality: str, dim: int, rank: int, alpha: float, *, rngs: nnx.Rngs):
    self.a = ModalityLoRA(jax.random.normal(rngs.params(), (dim, rank)) / jnp.sqrt(dim), modality=modality)
    self.b = ModalityLoRA(jnp.zeros((rank, dim)), modality=modality)
    self.scale = alpha / rank

  def __call__(self, e):
    return e + self.scale * (e @ self.a[...]) @ self.b[...]


class MultimodalLM(nnx.Module):
  """Encoders for this node's modalities + adapters + connector + decoder LM."""

  def __init__(self, modality_shapes: Mapping[str, Sequence[int]], encoder_types: Mapping[str, str],
               all_modalities: Sequence[str], cfg: ml_collections.ConfigDict, vocab_size: int,
               *, rngs: nnx.Rngs):
    """cfg: the model config (encoder, connector and backbone fields, see configs/)."""
    self.modalities = tuple(m for m in all_modalities if m in modality_shapes)
    if not self.modalities:
      raise ValueError('a node needs at least one modality')
    self.encoders = nnx.Dict({
        m: make_encoder(encoder_types[m], modality_shapes[m], cfg.encoder_width, cfg.d_enc, rngs=rngs)
        for m in self.modalities})
    self.adapters = nnx.Dict({
        m: ModalityAdapter(m, cfg.d_enc, cfg.adapter_rank, cfg.lora_alpha, rngs=rngs)
        for m in all_modalities})
    self.connector = Connector(self.modalities, cfg.d_enc, cfg.d_fuse, cfg.d_z, cfg.prompt_len,
                               cfg.backbone.width, rngs=rngs)
    self.backbone = DecoderLM(cfg.backbone, vocab_size, rngs=rngs)
    self.prompt_len = cfg.prompt_len

  def encode(self, inputs: Mapping[str, jax.Array], mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(projected modality embeddings [B,K,d_fuse], fused representation z [B,d_z]).

    inputs: modality -> [B, *shape] for at least this node's modalities;
    mask: [B, K] presence of this node's modalities in `self.modalities` order.
    """
    emb = {}
    for k, m in enumerate(self.modalities):
      present = mask[:, k].astype(bool).reshape((-1,) + (1,) * (inputs[m].ndim - 1))
      x = jnp.where(present, inputs[m], 0.0)  # keeps NaN/garbage of missing inputs out of the graph
      emb[m] = self.adapters[m](self.encoders[m](x))
    projected = self.connector.project(emb)
    return projected, self.connector.fuse(projected, mask)

  def prefix(self, z: jax.Array, instr: jax.Array, instr_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embeddings [B, P+Li, d] and key mask of soft prompt + instruction tokens."""
    prompt = self.connector.prompt(z)
    x = jnp.concatenate([prompt, self.backbone.embed(instr)], axis=1)
    mask = jnp.concatenate([jnp.ones(prompt.shape[:2], instr_mask.dtype), instr_mask], axis=1)
    return x, mask

  def __call__(self, z: jax.Array, instr: jax.Array, instr_mask: jax.Array, answer: jax.Array,
               answer_mask: jax.Array) -> jax.Array:
    """Teacher-forced logits predicting each answer token: [B, La, V]."""
    x, mask = self.prefix(z, instr, instr_mask)
    x = jnp.concatenate([x, self.backbone.embed(answer[:, :-1])], axis=1)
    mask = jnp.concatenate([mask, answer_mask[:, :-1]], axis=1)
    logits, _ = self.backbone(x, mask)
    la = answer.shape[1]
    return logits[:, -la:]

  def generate(self, z: jax.Array, instr: jax.Array, instr_mask: jax.Array, max_len: int,
               use_cache: bool = True) -> jax.Array:
    """Greedy decoding of `max_len` answer tokens [B, max_len] after prompt + instruction."""
    x, mask = self.prefix(z, instr, instr_mask)
    b, t0, _ = x.shape
    total = t0 + max_len
    full_mask = jnp.concatenate([mask, jnp.ones((b, max_len), mask.dtype)], axis=1)
    if not use_cache:
      return self._generate_recompute(x, full_mask, max_len)
    cache = self.backbone.init_cache(b, total, x.dtype)
    logits, cache = self.backbone(x, full_mask, 0, cache)
    first = jnp.argmax(logits[:, -1], axis=-1)
    backbone = self.backbone

    def step(carry, i):
      tok, cache = carry
      logits, cache = backbone(backbone.embed(tok)[:, None], full_mask, t0 + i, cache)
      nxt = jnp.argmax(logits[:, -1], axis=-1)
      return (nxt, cache), tok

    (_, _), toks = jax.lax.scan(step, (first, cache), jnp.arange(max_len))
    return toks.T

  def _generate_recompute(self, x, full_mask, max_len):
    """Reference decoding that reruns the full sequence every step (no cache)."""
    t0 = x.shape[1]
    toks = []
    for i in range(max_len):
      logits, _ = self.backbone(x, full_mask[:, :t0 + i])
      tok = jnp.argmax(logits[:, -1], axis=-1)
      toks.append(tok)
      x = jnp.concatenate([x, self.backbone.embed(tok)[:, None]], axis=1)
    return jnp.stack(toks, axis=1)
