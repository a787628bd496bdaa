"""`materialized_cotangent`: the identity, whose gradient XLA computes once instead of inside every consumer.

In the backward pass of a residual stack, the stream's gradient is elementwise from one block to the next
once each LayerNorm's reductions are apart, and XLA:CPU fuses that chain into every consumer of every
block's gradient: each consumer recomputes the chain of all later blocks (measured on the comparison's
server LM, 4 blocks: six fusions per block over up to 88 inputs each, the program's most expensive
operators). An optimization barrier would stop the fusion, but XLA:CPU removes barriers before fusing; a
conditional is never fused into, so the gradient passes through one whose two branches are the identity.
Under `jax.vmap` a conditional on batched data becomes a select (fused again), so the conditional is kept
out of the batching (`jax.custom_batching.custom_vmap`): its predicate reads one element of the whole
batched gradient. Values are unchanged (both branches multiply by 1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap


@custom_vmap
def _unfused(x: jax.Array) -> jax.Array:
  keep = lambda y: y * jnp.ones((), y.dtype)   # not the bare identity, which JAX would forward around the cond
  return jax.lax.cond(jnp.isfinite(x.reshape(-1)[0]), keep, keep, x)


@_unfused.def_vmap
def _unfused_batched(axis_size, in_batched, x):
  del axis_size
  return _unfused(x), in_batched[0]   # one conditional over the whole batch, its predicate unbatched


@jax.custom_vjp
def materialized_cotangent(x: jax.Array) -> jax.Array:
  """The identity; its cotangent is materialised (not fused into its consumers) in the backward pass."""
  return x


def _fwd(x):
  return x, None


def _bwd(_, g):
  return (_unfused(g),)


materialized_cotangent.defvjp(_fwd, _bwd)
