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
      # Both adapters as one rank-2r product with the gates folded into B: the gates' gradients are then
      # sums over B's few rows, not over every output of the layer (measured on the comparison's
      # models: a round 1.53 -> 1.09 s, one run; the sum of the two products is the same map).
      a = jnp.concatenate([self.shared_a[...], self.private_a[...]], axis=1)
      b = jnp.concatenate([g[0] * self.shared_b[...], g[1] * self.private_b[...]], axis=0)
      y = y + self.scale * ((x @ a) @ b)
    return y
