"""The weighted, modality-aware mean of the clients' uploads: the one reduction every aggregator uses.

A leaf that is not modality-specific is averaged with the client weights; a modality-specific leaf
(`leaf_mod` >= 0, see `ml_ecs.algorithms.ml_ecs.mma.leaf_modalities`) with that modality's column of
the presence weights, so only its holders contribute. A client whose upload has a NaN/Inf takes no
part, and a leaf no client contributes to keeps its previous value.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def clients_finite(tree):
  """[C] bool: every leaf of stacked client c is finite. Host (numpy) trees are checked on the host
  with numpy (no transfer), device trees on the device."""
  leaves = jax.tree.leaves(tree)
  xp = np if all(isinstance(x, np.ndarray) for x in leaves) else jnp
  return xp.stack([xp.isfinite(x.reshape(x.shape[0], -1)).all(1) for x in leaves]).all(0)


def mean_from_sums(weighted_sum: jax.Array, total: jax.Array, previous: jax.Array) -> jax.Array:
  """weighted_sum / total, or `previous` where the total weight is 0."""
  return jnp.where(total > 0, weighted_sum / jnp.maximum(total, 1e-12), previous)


def weighted_mean(x: jax.Array, w: jax.Array, previous: jax.Array) -> jax.Array:
  """sum_c w_c x_c / sum_c w_c over the leading client axis of x; `previous` where the weights sum to 0.
  Rows of zero weight must be finite (zero them first)."""
  return mean_from_sums(jnp.tensordot(w, x, axes=1), w.sum(), previous)


def leaf_weights(weights: jax.Array, presence: jax.Array, modality: int, modality_aware: bool) -> jax.Array:
  """The client weights of one leaf: `presence[:, modality]` for a modality-specific leaf (when
  modality_aware), else `weights`."""
  return presence[:, modality] if (modality_aware and modality >= 0) else weights


def modality_mean(stacked: Sequence, weights: Sequence[jax.Array], presence: Sequence[jax.Array], previous,
                  leaf_mod, modality_aware: bool):
  """Weighted mean of the clients' shared pytrees, one array per cohort in each sequence.

  stacked[k]: cohort k's pytree with a leading client axis; weights[k]: [C_k]; presence[k]: [C_k, M]
  weights of modality m's leaves (used iff modality_aware); previous: the current global pytree.
  Returns (new global, number of clients excluded for a non-finite upload).
  """
  tree = jax.tree.map(lambda *xs: jnp.concatenate(xs), *stacked)
  finite = clients_finite(tree)
  w = jnp.where(finite, jnp.concatenate(weights), 0.0)
  pres = jnp.where(finite[:, None], jnp.concatenate(presence), 0.0)

  def reduce(x, prev, m):
    x = jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
    return weighted_mean(x, leaf_weights(w, pres, m, modality_aware), prev)

  return jax.tree.map(reduce, tree, previous, leaf_mod), jnp.sum(~finite)
