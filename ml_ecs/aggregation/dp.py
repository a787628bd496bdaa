"""Gaussian noise of central DP (DP-FedAvg, McMahan et al. 2018) for the shared LoRA and for SE-CCL's
representations; the privacy accountant is ml_ecs.aggregation.privacy."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def add_gaussian_noise(update: jax.Array, weights: jax.Array, clip_norm: float, noise_multiplier: float,
                       key: jax.Array) -> jax.Array:
  """`update` (a weighted mean of updates clipped to `clip_norm`) plus Gaussian noise of std
  z * S * max_c w_c / sum_c w_c on every coordinate: the L2 sensitivity of the weighted mean to one
  client's clipped update when the weights are public (with equal weights TFF's z * S / n)."""
  std = noise_multiplier * clip_norm * weights.max() / jnp.maximum(weights.sum(), 1e-12)
  return update + std * jax.random.normal(key, update.shape, update.dtype)


def noise_representation_targets(valid: Sequence[jax.Array], weights: Sequence[jax.Array],
                                   ids: Sequence[jax.Array], num_public: int, key: jax.Array, clip_norm: float,
                                   noise_multiplier: float, targets: jax.Array) -> jax.Array:
  """DP for SE-CCL: `targets` (the weighted per-sample mean of the clipped representations) plus noise.

  Each client's representation matrix (its valid rows) must already be clipped to `clip_norm` in L2
  (`clip_representations`); the per-row noise std is z * R * max_c(w_c v_cj) / sum_c(w_c v_cj), the
  sensitivity of row j of the weighted mean to one client's clipped upload.
  """
  wv = jnp.concatenate([(v * w[:, None]).reshape(-1) for v, w in zip(valid, weights)])
  flat_ids = jnp.concatenate([i.reshape(-1) for i in ids])
  den = jax.ops.segment_sum(wv, flat_ids, num_segments=num_public)
  top = jax.ops.segment_max(wv, flat_ids, num_segments=num_public)
  std = noise_multiplier * clip_norm * jnp.maximum(top, 0.0) / jnp.maximum(den, 1e-12)
  return targets + std[:, None] * jax.random.normal(key, targets.shape, targets.dtype)


def clip_representations(z: jax.Array, valid: jax.Array, clip_norm: float) -> jax.Array:
  """[C, N, d] representations with each client's valid rows scaled to an L2 norm of at most clip_norm."""
  zv = jnp.where(valid[..., None] > 0, jnp.nan_to_num(z), 0.0)
  norm = jnp.sqrt(jnp.sum(jnp.square(zv), axis=(1, 2)))
  return jnp.where(jnp.isfinite(z), zv * jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))[:, None, None], z)
