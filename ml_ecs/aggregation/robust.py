"""Robust and differentially private aggregation of the clients' shared-LoRA updates.

The server's aggregation step of a round (`aggregate`, jitted once per federation):

  update_c = uploaded shared_c - global shared before the round      (per client, whole pytree)
  1. exclusion: a client with a non-finite upload, or weight 0 (dropped, late, padding), takes no part;
  2. clipping:  update_c *= min(1, S / ||update_c||) with S = aggregation.clip_norm (0 = off) and,
                under DP, S = dp.clip_norm (the smaller of the two if both are set);
  3. rule (aggregation.rule):
       'mean'          MMA-weighted mean (modality-specific leaves over their holders only);
       'norm_outlier'  as 'mean' after rejecting clients whose update norm exceeds
                       median + k * MAD of the participants' norms (k = aggregation.outlier_k;
                       needs >= 3 participants to reject anything);
       'trimmed_mean'  coordinate-wise mean after dropping the trim_fraction largest and smallest
                       values of the holders (unweighted);
       'median'        coordinate-wise median of the holders (unweighted);
  4. DP (dp.enabled, 'mean' / 'norm_outlier' only): Gaussian noise of std z * S * max_c w_c / sum_c w_c on
     every coordinate of a leaf (w: that leaf's effective weights), the L2 sensitivity of the weighted mean
     to one client's clipped update when the weights are public (DP-FedAvg, McMahan et al. 2018; with
     equal weights this is TFF's z * S / n).
  new global = previous global + aggregated update (a leaf no participant holds keeps its value).

Metrics: agg/participants, mma/excluded (non-finite), agg/rejected, agg/clipped, agg/update_norm_median,
agg/update_norm_max; per-client masks come back for the ids in the round's metrics.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ml_ecs.aggregation.mean import clients_finite, leaf_weights, weighted_mean

RULES = ('mean', 'norm_outlier', 'trimmed_mean', 'median')


class AggregateOut(NamedTuple):
  shared: object          # the new global shared pytree
  participated: jax.Array  # [C] bool: finite, weight > 0, not rejected (what was averaged)
  nonfinite: jax.Array     # [C] bool: weight > 0 but a NaN/Inf upload
  rejected: jax.Array      # [C] bool: rejected as a norm outlier
  clipped: jax.Array       # [C] bool: update norm above the clipping bound
  norms: jax.Array         # [C] update norms (0 for non-finite)


def options(cfg) -> dict:
  """Keyword options of `aggregate` from a validated config (fields `aggregation`, `dp`)."""
  agg, dp = cfg.aggregation, cfg.dp
  clip = float(agg.clip_norm)
  if dp.enabled:
    clip = min(clip, float(dp.clip_norm)) if clip > 0 else float(dp.clip_norm)
  return dict(rule=str(agg.rule), clip_norm=clip, outlier_k=float(agg.outlier_k),
              trim_fraction=float(agg.trim_fraction),
              noise_multiplier=float(dp.noise_multiplier) if dp.enabled else 0.0)


def _masked_median(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.nanmedian(jnp.where(mask, x, jnp.nan))


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _trimmed(x: jax.Array, holders: jax.Array, trim: float) -> jax.Array:
  """Coordinate-wise mean of the holders' rows of x after dropping floor(trim * n) at each end."""
  n = holders.sum()
  srt = jnp.sort(jnp.where(_bcast(holders, x), x, jnp.inf), axis=0)   # holders first, ascending
  t = jnp.floor(trim * n).astype(jnp.int32)
  rank = jnp.arange(x.shape[0])
  keep = (rank >= t) & (rank < n - t)
  kept = jnp.where(_bcast(keep, x), srt, 0.0)
  return kept.sum(0) / jnp.maximum(n - 2 * t, 1)


def aggregate(stacked: Sequence, weights: Sequence[jax.Array], presence: Sequence[jax.Array], previous,
              noise_key: jax.Array, *, leaf_mod, modality_aware: bool, rule: str = 'mean', clip_norm: float = 0.0,
              outlier_k: float = 3.0, trim_fraction: float = 0.1, noise_multiplier: float = 0.0) -> AggregateOut:
  """One round's aggregation (see the module docstring); one array per cohort in each sequence.

  stacked[k]: cohort k's uploaded shared pytree [C_k, ...]; weights[k]: [C_k] (0 = not uploaded);
  presence[k]: [C_k, M] weights of modality m's leaves (`mma.modality_weights`; 0 = does not hold m), used
  iff modality_aware; previous: the global shared pytree of the round's broadcast.
  `noise_multiplier` > 0 adds DP noise (requires clip_norm > 0 and rule 'mean' / 'norm_outlier').
  """
  tree = jax.tree.map(lambda *xs: jnp.concatenate(xs), *stacked)
  w = jnp.concatenate(weights)
  pres = jnp.concatenate(presence)
  uploaded = w > 0
  finite = clients_finite(tree)
  nonfinite = uploaded & ~finite
  ok = uploaded & finite
  delta = jax.tree.map(lambda x, p: jnp.where(_bcast(ok, x), x - p[None], 0.0), tree, previous)
  sq = sum(jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1) for d in jax.tree.leaves(delta))
  norms = jnp.sqrt(sq)
  rejected = jnp.zeros_like(ok)
  if rule == 'norm_outlier':
    med = _masked_median(norms, ok)
    mad = _masked_median(jnp.abs(norms - med), ok)
    rejected = ok & (norms > med + outlier_k * mad) & (ok.sum() >= 3)
  part = ok & ~rejected
  clipped = jnp.zeros_like(ok)
  if clip_norm > 0:
    clipped = part & (norms > clip_norm)
    scale = jnp.where(clipped, clip_norm / jnp.maximum(norms, 1e-30), 1.0)
    delta = jax.tree.map(lambda d: d * _bcast(scale, d), delta)
  wp = jnp.where(part, w, 0.0)
  plain = rule in ('mean', 'norm_outlier') and clip_norm <= 0 and noise_multiplier <= 0
  leaves, treedef = jax.tree.flatten(delta)
  xs = [jnp.where(_bcast(part, x), x, 0.0) for x in jax.tree.leaves(tree)]
  keys = jax.random.split(noise_key, len(leaves))
  out = []
  pres_p = jnp.where(part[:, None], pres, 0.0)
  for d, x, prev, m, key in zip(leaves, xs, jax.tree.leaves(previous), jax.tree.leaves(leaf_mod), keys):
    modal = modality_aware and m >= 0
    holds = pres[:, m] > 0 if modal else jnp.ones_like(part)
    wm = leaf_weights(wp, pres_p, m, modality_aware)   # modality leaves: their own weights (mma)
    if rule in ('trimmed_mean', 'median'):
      holders = part & holds
      if rule == 'median':
        upd = jnp.nan_to_num(jnp.nanmedian(jnp.where(_bcast(holders, d), d, jnp.nan), axis=0))
      else:
        upd = _trimmed(d, holders, trim_fraction)
      total = holders.sum().astype(d.dtype)
    elif plain:   # the plain weighted mean of the uploads themselves
      out.append(weighted_mean(x, jnp.where(holds, wm, 0.0), prev))
      continue
    else:
      wl = jnp.where(holds, wm, 0.0)
      total = wl.sum()
      upd = jnp.tensordot(wl, d, axes=1) / jnp.maximum(total, 1e-12)
      if noise_multiplier > 0:
        std = noise_multiplier * clip_norm * wl.max() / jnp.maximum(total, 1e-12)
        upd = upd + std * jax.random.normal(key, upd.shape, upd.dtype)
    out.append(jnp.where(total > 0, prev + upd, prev))
  return AggregateOut(jax.tree.unflatten(treedef, out), part, nonfinite, rejected, clipped,
                      jnp.where(ok, norms, 0.0))


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
