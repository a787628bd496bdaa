"""SE-CCL, SLM-enhanced CCL: bidirectional alignment of fused representations on public data.

The server sends its fused representations z of the public split down; each client
aligns its own z to them (InfoNCE, positives = same public sample id); the clients send
theirs up and the server aligns to their weighted mean per sample (`se_ccl_targets`).
Config: `method.se_ccl`, `method.lambda_se_ccl`, `method.tau_se_ccl`.
Metric names: client/public_se_ccl, server/se_ccl.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ml_ecs.ccl import l2_normalize, masked_soft_ce


def _direction(logits: jax.Array, valid: jax.Array, pos: jax.Array) -> jax.Array:
  """Mean soft-target CE over rows (axis 1 = candidates) that have a positive; 0 if none."""
  n_pos = jnp.sum(pos, axis=1)
  probs = pos / jnp.maximum(n_pos, 1)[:, None].astype(logits.dtype)
  ce = masked_soft_ce(logits, valid, probs, axis=1)
  has = n_pos > 0
  total = jnp.sum(jnp.where(has, ce, 0))
  return total / jnp.maximum(jnp.sum(has), 1).astype(total.dtype)


def se_ccl_loss(z: ArrayLike, targets: ArrayLike, z_ids: ArrayLike, target_ids: ArrayLike,
                   z_mask: ArrayLike, target_mask: ArrayLike, tau: ArrayLike,
                   symmetric: bool = True) -> jax.Array:
  """InfoNCE aligning z to targets; positives are pairs with the same sample id.

  Soft targets P_ij = 1[z_ids_i == target_ids_j] normalised over valid j; logits are
  cosine / tau. Masked rows/targets are excluded; rows without a positive are dropped.

  Args:
    z: [B, D] representations.
    targets: [M, D] alignment targets.
    z_ids: [B] int sample ids of z.
    target_ids: [M] int sample ids of targets (may repeat).
    z_mask: [B]; nonzero marks valid z rows.
    target_mask: [M]; nonzero marks valid targets.
    tau: temperature.
    symmetric: static; also add the targets -> z direction (the two are averaged).

  Returns:
    Scalar loss; 0 if no valid positive pair exists.
  """
  zm = jnp.asarray(z_mask).astype(bool)
  tm = jnp.asarray(target_mask).astype(bool)
  zn = l2_normalize(z, zm)
  tn = l2_normalize(targets, tm)
  logits = zn @ tn.T / tau                                  # [B, M]
  valid = zm[:, None] & tm[None, :]
  pos = ((jnp.asarray(z_ids)[:, None] == jnp.asarray(target_ids)[None, :]) & valid)
  pos = pos.astype(logits.dtype)
  loss = _direction(logits, valid, pos)
  if symmetric:
    loss = 0.5 * (loss + _direction(logits.T, valid.T, pos.T))
  return loss


def se_ccl_targets(z: Sequence[jax.Array], ids: Sequence[jax.Array], valid: Sequence[jax.Array],
                   weights: Sequence[jax.Array], num_public: int) -> tuple[jax.Array, jax.Array]:
  """The server's alignment targets: weighted mean of uploaded client representations per public sample.

  z[k]: [C_k, N, d]; ids[k]: [C_k, N] public positions; valid[k]: [C_k, N]; weights[k]: [C_k]
  (one entry per cohort). Non-finite uploads get no weight.
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
