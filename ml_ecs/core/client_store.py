"""Where the clients' stacked rows live: on the devices (sharded on the client axis) or, with
`train.host_state`, in host numpy arrays of which only the sampled, diverged or evaluated block moves to
the devices. Blocks are padded to bucketed sizes so blocks of any size share one compiled function."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def per_client_keys(key: jax.Array, positions: jax.Array) -> jax.Array:
  """One key per client position, independent of how many clients are stacked or padded."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(positions)


def broadcast_to_clients(global_tree, stacked):
  """`global_tree` repeated along the leading client axis of `stacked` (same structure)."""
  return jax.tree.map(lambda g, x: jnp.broadcast_to(g, x.shape), global_tree, stacked)


@jax.jit
def _first_on_device(tree):
  return jax.tree.map(lambda x: x[0], tree)


def first_row(tree):
  """Row 0 of every leaf of a client-stacked tree, as new device arrays: host (numpy) leaves move only
  that row; device leaves are sliced in one compiled call (not one eagerly dispatched op per leaf)."""
  if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree)):
    return jax.device_put(jax.tree.map(lambda x: np.array(x[0]), tree))
  return _first_on_device(tree)


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def bucket(n: int, multiple: int = 1) -> int:
  """Padded block size for `n` clients: the next power of two, rounded up to `multiple` (the device
  count), so blocks of any size up to it share one compiled function."""
  return round_up(1 << max(int(n) - 1, 0).bit_length(), multiple)


def pad_positions(pos: np.ndarray, size: int) -> np.ndarray:
  """`pos` padded to `size` with copies of its first entry (their results are discarded)."""
  pos = np.asarray(pos, np.int64)
  return np.concatenate([pos, np.full(size - len(pos), pos[0], np.int64)])


@jax.jit
def _take_clients(tree, pos):
  return jax.tree.map(lambda x: x[pos], tree)


def gather_clients(tree, pos: np.ndarray, sharding=None):
  """Rows `pos` of every leaf of a client-stacked tree: host (numpy) leaves are gathered on the host
  and only the block is placed on the devices (`sharding`); device leaves are gathered there."""
  if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree)):
    block = jax.tree.map(lambda x: np.take(x, pos, axis=0), tree)
    return jax.device_put(block, sharding) if sharding is not None else block
  return _take_clients(tree, jnp.asarray(pos))


def scatter_clients(host_tree, pos: np.ndarray, block) -> None:
  """Writes the rows of `block` (device or host) back into the host arrays of `host_tree` at `pos`,
  in place: the host counterpart of donating the state to the compiled round."""
  jax.tree.map(lambda h, b: h.__setitem__(pos, np.asarray(b)), host_tree, block)


def host_init(init_fn: Callable, keys: jax.Array, block: int) -> Any:
  """`init_fn(keys)` (a client-stacked tree) computed `block` keys at a time and written into host
  numpy arrays, so the devices hold one block, never the whole cohort."""
  n, out = len(keys), None
  for i in range(0, n, block):
    pos = np.arange(i, min(i + block, n))
    part = jax.tree.map(np.asarray, init_fn(keys[jnp.asarray(pad_positions(pos, block))]))
    if out is None:
      out = jax.tree.map(lambda x: np.empty((n,) + x.shape[1:], x.dtype), part)
    scatter_clients(out, pos, jax.tree.map(lambda x: x[:len(pos)], part))
  return out
