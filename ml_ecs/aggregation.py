"""MMA: modality-aware aggregation of the shared LoRA, and of uploaded fused representations.

All sampled clients of all cohorts are aggregated by one jitted weighted
reduction over their stacked shared pytrees (cohorts are concatenated on the
client axis; the shared part has the same structure on every edge client).
Client weights:
  'fedavg'           n_samples, every leaf over every client (plain FedAvg);
  'modality'         number of modalities the client has;
  'modality_samples' number of modalities x n_samples.
With the modality-aware weightings a modality adapter leaf (path under
`adapters/<modality>`) is averaged only over the clients that have that
modality. A client whose update has a NaN/Inf is excluded and counted.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTINGS = ('fedavg', 'modality', 'modality_samples')


def client_weights(kind: str, num_samples: np.ndarray, num_modalities: np.ndarray) -> np.ndarray:
  """Unnormalised per-client weights of a weighting kind."""
  if kind == 'fedavg':
    return num_samples.astype(np.float32)
  if kind == 'modality':
    return num_modalities.astype(np.float32)
  if kind == 'modality_samples':
    return (num_modalities * num_samples).astype(np.float32)
  raise ValueError(f'method.mma_weights must be one of {WEIGHTINGS}, got {kind!r}')


def leaf_modalities(shared_template, modalities: Sequence[str]):
  """Pytree like `shared_template` whose leaves are the modality index of an adapter leaf, else -1."""
  def index(path, _):
    keys = [getattr(k, 'key', getattr(k, 'idx', None)) for k in path]
    if 'adapters' in keys:
      return modalities.index(keys[keys.index('adapters') + 1])
    return -1
  return jax.tree_util.tree_map_with_path(index, shared_template)


def is_finite(tree) -> jax.Array:
  """[C] bool: every leaf of client c is finite."""
  leaves = jax.tree.leaves(tree)
  return jnp.stack([jnp.isfinite(x.reshape(x.shape[0], -1)).all(1) for x in leaves]).all(0)


def aggregate(stacked: Sequence, weights: Sequence[jax.Array], presence: Sequence[jax.Array],
              previous, leaf_mod, modality_aware: bool):
  """Weighted mean of the clients' shared pytrees (one array per cohort in each sequence).

  stacked[k]: cohort k's shared pytree with leading client axis; weights[k]: [C_k];
  presence[k]: [C_k, M] 0/1 modality presence; previous: the current global shared pytree
  (kept for a leaf no valid client contributes to). Returns (new global, number excluded).
  """
  tree = jax.tree.map(lambda *xs: jnp.concatenate(xs), *stacked)
  w = jnp.concatenate(weights)
  pres = jnp.concatenate(presence)
  finite = is_finite(tree)
  w = jnp.where(finite, w, 0.0)

  def reduce(x, prev, m):
    wl = w * pres[:, m] if (modality_aware and m >= 0) else w
    total = wl.sum()
    x = jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
    mean = jnp.tensordot(wl, x, axes=1) / jnp.maximum(total, 1e-12)
    return jnp.where(total > 0, mean, prev)

  return jax.tree.map(reduce, tree, previous, leaf_mod), jnp.sum(~finite)


def aggregate_representations(z: Sequence[jax.Array], ids: Sequence[jax.Array], valid: Sequence[jax.Array],
                              weights: Sequence[jax.Array], num_public: int) -> tuple[jax.Array, jax.Array]:
  """Weighted mean of uploaded fused representations per public sample.

  z[k]: [C_k, N, d]; ids[k]: [C_k, N] public positions; valid[k]: [C_k, N]; weights[k]: [C_k].
  Returns (targets [num_public, d], has_target [num_public]).
  """
  zs = jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in z])
  flat_ids = jnp.concatenate([i.reshape(-1) for i in ids])
  wv = jnp.concatenate([(v * w[:, None]).reshape(-1) for v, w in zip(valid, weights)])
  wv = jnp.where(jnp.isfinite(zs).all(-1), wv, 0.0)
  zs = jnp.where(wv[:, None] > 0, zs, 0.0)
  num = jax.ops.segment_sum(zs * wv[:, None], flat_ids, num_segments=num_public)
  den = jax.ops.segment_sum(wv, flat_ids, num_segments=num_public)
  return num / jnp.maximum(den, 1e-12)[:, None], den > 0
