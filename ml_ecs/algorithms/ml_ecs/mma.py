"""MMA, modality-aware model aggregation of the clients' shared LoRA.

All sampled clients of all cohorts are aggregated by one jitted weighted
reduction over their stacked shared pytrees (cohorts are concatenated on the
client axis; the shared part has the same structure on every edge client).
Two weightings, because the evidence behind the two kinds of shared parameters differs:

`method.mma_backbone`, client weights of the backbone's shared LoRA (and every other
shared leaf that is not modality-specific):
  'samples'          n_samples (plain FedAvg; faithful default: every private sample is
                     equal evidence for the backbone, whatever modalities it came with);
  'modality'         number of modalities the client has;
  'modality_samples' number of modalities x n_samples (the original).
`method.mma_modality`, weights of a modality-specific leaf (variable type
`ModalityLoRA`, tagged with its modality; the shared modality projections of
`ml_ecs.models.multimodal`, which all holders of the modality share in coordinates
and initialisation):
  'observations'     the number of the client's private training samples in which the
                     modality is actually present (per-sample presence counts; faithful
                     default): only holders of the modality contribute;
  'client'           the backbone weight, over the clients whose modality set has the
                     modality (the original modality-aware rule);
  'samples'          the backbone weight over every client (plain FedAvg of the leaf).
The weights are applied by the one weighted mean of `ml_ecs.aggregation.mean` (through the
round's aggregator, `ml_ecs.aggregation.robust`). A client whose update has a NaN/Inf is excluded
and counted (metric mma/excluded).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ml_ecs.models.variables import ModalityLoRA

WEIGHTINGS = ('samples', 'modality', 'modality_samples')
MODALITY_WEIGHTINGS = ('observations', 'client', 'samples')


def client_weights(kind: str, num_samples: np.ndarray, num_modalities: np.ndarray) -> np.ndarray:
  """Unnormalised per-client weights of a weighting kind (`method.mma_backbone`)."""
  if kind == 'samples':
    return num_samples.astype(np.float32)
  if kind == 'modality':
    return num_modalities.astype(np.float32)
  if kind == 'modality_samples':
    return (num_modalities * num_samples).astype(np.float32)
  raise ValueError(f'method.mma_backbone must be one of {WEIGHTINGS}, got {kind!r}')


def modality_weights(kind: str, weights: np.ndarray, has: np.ndarray, observations: np.ndarray) -> np.ndarray:
  """[clients, M] weights of the modality-specific leaves (`method.mma_modality`).

  weights: [clients] backbone weights; has: [clients, M] 0/1 modality sets;
  observations: [clients, M] private training samples with the modality present.
  """
  if kind == 'observations':
    return observations.astype(np.float32)
  if kind == 'client':
    return (weights[:, None] * has).astype(np.float32)
  if kind == 'samples':
    return np.broadcast_to(weights[:, None], has.shape).astype(np.float32)
  raise ValueError(f'method.mma_modality must be one of {MODALITY_WEIGHTINGS}, got {kind!r}')


def rows(table: np.ndarray, client_ids: np.ndarray, num_rows: int) -> np.ndarray:
  """`table[client_ids]` padded with zero rows to num_rows (padding clients weigh nothing)."""
  out = np.zeros((num_rows,) + table.shape[1:], np.float32)
  out[:len(client_ids)] = table[client_ids]
  return out


def leaf_modalities(shared: nnx.State, modalities: Sequence[str]):
  """Pytree of `shared`'s structure whose leaves are the modality index of a `ModalityLoRA` leaf, else -1."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  variables = jax.tree.leaves(shared, is_leaf=is_var)
  index = [modalities.index(v.get_metadata()['modality']) if isinstance(v, ModalityLoRA) else -1 for v in variables]
  return jax.tree.unflatten(jax.tree.structure(shared), index)
