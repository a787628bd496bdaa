"""The random keys a model is built from: `KeyStream`, a stand-in for `nnx.Rngs` when building a model."""
from __future__ import annotations

import jax
import jax.numpy as jnp


class KeyStream:
  """Gives the keys `nnx.Rngs(key)` would give when a model is built: its default stream's
  `fold_in(key, 0)`, `fold_in(key, 1)`, ... for `.params()`, `.default()` or a call, in order.

  Why not `nnx.Rngs` itself (flax 0.12): under tracing (`jax.jit`, `vmap`, `nnx.eval_shape`) each
  draw updates the stream's count, an nnx Variable whose update asks the traced count for its
  `sharding`; a tracer answers with an AttributeError whose message JAX builds by pretty-printing where
  the tracer came from. Building a model under tracing draws a key per weight, so that was about a fifth
  of the warm set-up of a program of 4 runs (`ml_ecs.core.runs`: 13.7-14.6 s with `nnx.Rngs`, 11.0-11.5 s
  with this; 2 interleaved pairs). Here the
  count is a Python int, so a traced build costs no more than the keys themselves. The parameters
  are the same, bit for bit (tests/unit/test_models.py). Only for building: a module that keeps its
  rngs to draw from later (e.g. dropout) needs `nnx.Rngs`; none of ours does.
  """

  def __init__(self, key: int | jax.Array):
    """key: a seed, a typed key or raw uint32 key data (as `nnx.Rngs` takes them)."""
    if isinstance(key, int):
      key = jax.random.key(key)
    elif key.dtype == jnp.uint32:
      key = jax.random.wrap_key_data(key)
    self._key, self._count = key, 0

  def __call__(self) -> jax.Array:
    key = jax.random.fold_in(self._key, self._count)
    self._count += 1
    return key

  def params(self) -> jax.Array:
    return self()

  def default(self) -> jax.Array:
    return self()
