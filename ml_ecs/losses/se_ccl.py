"""The SE-CCL alignment loss: InfoNCE between a node's representations and alignment targets, positives by
sample id (the round plumbing of SE-CCL is ml_ecs.algorithms.ml_ecs.se_ccl)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ml_ecs.losses.ccl import l2_normalize, masked_soft_ce


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
