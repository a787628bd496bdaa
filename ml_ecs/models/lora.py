"""Linear layer with a frozen base and gated shared + private LoRA adapters."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ml_ecs.models.variables import Frozen, PrivateLoRA, SharedLoRA


class LoRALinear(nnx.Module):
  """y = x W + b + (alpha / r) * (g_s x A_s B_s + g_p x A_p B_p).

  W, b are `Frozen`; (A_s, B_s) are `SharedLoRA`, (A_p, B_p) `PrivateLoRA`.
  B starts at zero so a fresh adapter leaves the base layer unchanged. With
  rank 0 the layer is the plain frozen linear map.
  """

  def __init__(self, din: int, dout: int, rank: int, alpha: float, *, rngs: nnx.Rngs,
               init_std: float = 0.02):
    self.kernel = Frozen(init_std * jax.random.normal(rngs.params(), (din, dout)))
    self.bias = Frozen(jnp.zeros((dout,)))
    self.rank = rank
    self.scale = alpha / max(rank, 1)
    if rank > 0:
      a_std = 1.0 / jnp.sqrt(din)
      self.shared_a = SharedLoRA(a_std * jax.random.normal(rngs.params(), (din, rank)))
      self.shared_b = SharedLoRA(jnp.zeros((rank, dout)))
      self.private_a = PrivateLoRA(a_std * jax.random.normal(rngs.params(), (din, rank)))
      self.private_b = PrivateLoRA(jnp.zeros((rank, dout)))

  def __call__(self, x: jax.Array, gates: jax.Array | None = None) -> jax.Array:
    y = x @ self.kernel[...] + self.bias[...]
    if self.rank > 0:
      g = jnp.ones((2,), x.dtype) if gates is None else gates
      shared = (x @ self.shared_a[...]) @ self.shared_b[...]
      private = (x @ self.private_a[...]) @ self.private_b[...]
      y = y + self.scale * (g[0] * shared + g[1] * private)
    return y
