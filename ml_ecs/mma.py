"""MMA, modality-aware model aggregation of the clients' shared LoRA.

All sampled clients of all cohorts are aggregated by one jitted weighted
reduction over their stacked shared pytrees (cohorts are concatenated on the
client axis; the shared part has the same structure on every edge client).
Client weights (`method.mma`):
  'samples'          n_samples, every leaf over every client (plain FedAvg);
  'modality'         number of modalities the client has;
  'modality_samples' number of modalities x n_samples.
With the modality-aware weightings a modality-specific leaf (variable type
`ModalityLoRA`, tagged with its modality) is averaged only over the clients that
have that modality. A client whose update has a NaN/Inf is excluded and counted
(metric mma/excluded).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ml_ecs.models.variables import ModalityLoRA

WEIGHTINGS = ('samples', 'modality', 'modality_samples')


def client_weights(kind: str, num_samples: np.ndarray, num_modalities: np.ndarray) -> np.ndarray:
  """Unnormalised per-client weights of a weighting kind."""
  if kind == 'samples':
    return num_samples.astype(np.float32)
  if kind == 'modality':
    return num_modalities.astype(np.float32)
  if kind == 'modality_samples':
    return (num_modalities * num_samples).astype(np.float32)
  raise ValueError(f'method.mma must be one of {WEIGHTINGS}, got {kind!r}')


def leaf_modalities(shared: nnx.State, modalities: Sequence[str]):
  """Pytree of `shared`'s structure whose leaves are the modality index of a `ModalityLoRA` leaf, else -1."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  variables = jax.tree.leaves(shared, is_leaf=is_var)
  index = [modalities.index(v.get_metadata()['modality']) if isinstance(v, ModalityLoRA) else -1 for v in variables]
  return jax.tree.unflatten(jax.tree.structure(shared), index)


def presence(client_modalities: Sequence[str], modalities: Sequence[str], num_rows: int, num_real: int) -> np.ndarray:
  """[num_rows, M] 0/1 modality presence of a cohort's selected rows (padding rows: all 0)."""
  out = np.zeros((num_rows, len(modalities)), np.float32)
  out[:num_real, [modalities.index(m) for m in client_modalities]] = 1.0
  return out


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
