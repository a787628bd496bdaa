"""Model-state partition (frozen / shared / private / encoders / connector),
client-axis stacking, and parameter accounting."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ml_ecs.models.variables import Frozen, Gate, PrivateLoRA, SharedLoRA

PARTS = ('frozen', 'shared', 'private', 'encoders', 'connector')
TRAINABLE = ('shared', 'private', 'encoders', 'connector')
# Filter per part, applied in this order by nnx.split; `connector` takes the rest.
_FILTERS = (Frozen, SharedLoRA, (PrivateLoRA, Gate), nnx.PathContains('encoders'), ...)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, nnx.State]]:
  """(graphdef, {part: state}) for the five parts in PARTS."""
  graphdef, *states = nnx.split(model, *_FILTERS)
  return graphdef, dict(zip(PARTS, states))


def merge_model(graphdef: nnx.GraphDef, parts: dict[str, nnx.State]) -> nnx.Module:
  """Inverse of `split_model`."""
  return nnx.merge(graphdef, *(parts[p] for p in PARTS))


# How a frozen backbone is held on each device (`backbone.frozen_dtype`); it is computed with in float32.
FROZEN_DTYPES = ('float32', 'bfloat16')


def store_frozen(frozen: Any, dtype: str) -> Any:
  """The frozen backbone held in `dtype` (its floating leaves): bfloat16 halves its bytes per device.
  Arrays or abstract shapes (ml_ecs/run/sizing.py)."""
  if dtype == 'float32':
    return frozen
  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(dtype)
  return jax.tree.map(cast, frozen)


def compute_frozen(frozen: Any) -> Any:
  """A held frozen backbone as the model computes with it: bfloat16 leaves cast to float32. Called inside
  the jitted programs, so only the held copy stays resident between them."""
  return jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, frozen)


def stack(trees: Sequence[Any]) -> Any:
  """Stacks same-structure pytrees on a new leading client axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any) -> list[Any]:
  """Inverse of `stack`."""
  n = jax.tree.leaves(tree)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def row_shapes(stacked: Any) -> Any:
  """Shapes and dtypes of one row of a stacked tree (for `count`; nothing is sliced or computed)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked)


def count(tree: Any) -> tuple[int, int]:
  """(number of parameters, bytes) of a pytree of arrays."""
  leaves = jax.tree.leaves(tree)
  return (int(sum(np.prod(x.shape) for x in leaves)),
          int(sum(np.prod(x.shape) * x.dtype.itemsize for x in leaves)))


def count_parts(parts: dict[str, Any]) -> dict[str, dict[str, int]]:
  """{part: {'params': n, 'bytes': b}} plus a 'total' entry."""
  out = {}
  for name, tree in parts.items():
    n, b = count(tree)
    out[name] = {'params': n, 'bytes': b}
  out['total'] = {k: sum(v[k] for v in out.values()) for k in ('params', 'bytes')}
  return out
