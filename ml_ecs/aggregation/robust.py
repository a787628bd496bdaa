"""The server's aggregator: robust and differentially private aggregation of the clients' shared-LoRA updates,
composed of small pieces (`client_updates`, `norm_outliers`, `clip`, a rule per leaf, `ml_ecs.aggregation.dp`).

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

from ml_ecs.aggregation import dp
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
  agg, dp_ = cfg.aggregation, cfg.dp
  clip_norm = float(agg.clip_norm)
  if dp_.enabled:
    clip_norm = min(clip_norm, float(dp_.clip_norm)) if clip_norm > 0 else float(dp_.clip_norm)
  return dict(rule=str(agg.rule), clip_norm=clip_norm, outlier_k=float(agg.outlier_k),
              trim_fraction=float(agg.trim_fraction),
              noise_multiplier=float(dp_.noise_multiplier) if dp_.enabled else 0.0)


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _masked_median(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.nanmedian(jnp.where(mask, x, jnp.nan))


def client_updates(tree, previous, ok: jax.Array):
  """update_c = upload_c - previous global (zero for clients not `ok`), and its L2 norm over the whole pytree."""
  delta = jax.tree.map(lambda x, p: jnp.where(_bcast(ok, x), x - p[None], 0.0), tree, previous)
  sq = sum(jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1) for d in jax.tree.leaves(delta))
  return delta, jnp.sqrt(sq)


def norm_outliers(norms: jax.Array, ok: jax.Array, k: float) -> jax.Array:
  """[C] bool: norm above median + k * MAD of the `ok` clients' norms (never with fewer than 3 of them)."""
  med = _masked_median(norms, ok)
  mad = _masked_median(jnp.abs(norms - med), ok)
  return ok & (norms > med + k * mad) & (ok.sum() >= 3)


def clip(delta, norms: jax.Array, part: jax.Array, clip_norm: float):
  """(updates scaled to an L2 norm of at most clip_norm, [C] bool which were clipped)."""
  clipped = part & (norms > clip_norm)
  scale = jnp.where(clipped, clip_norm / jnp.maximum(norms, 1e-30), 1.0)
  return jax.tree.map(lambda d: d * _bcast(scale, d), delta), clipped


def trimmed_mean(x: jax.Array, holders: jax.Array, trim: float) -> jax.Array:
  """Coordinate-wise mean of the holders' rows of x after dropping floor(trim * n) at each end."""
  n = holders.sum()
  srt = jnp.sort(jnp.where(_bcast(holders, x), x, jnp.inf), axis=0)   # holders first, ascending
  t = jnp.floor(trim * n).astype(jnp.int32)
  rank = jnp.arange(x.shape[0])
  keep = (rank >= t) & (rank < n - t)
  kept = jnp.where(_bcast(keep, x), srt, 0.0)
  return kept.sum(0) / jnp.maximum(n - 2 * t, 1)


def median(x: jax.Array, holders: jax.Array) -> jax.Array:
  """Coordinate-wise median of the holders' rows of x (0 where there is none)."""
  return jnp.nan_to_num(jnp.nanmedian(jnp.where(_bcast(holders, x), x, jnp.nan), axis=0))


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
  ok = uploaded & finite
  delta, norms = client_updates(tree, previous, ok)
  rejected = norm_outliers(norms, ok, outlier_k) if rule == 'norm_outlier' else jnp.zeros_like(ok)
  part = ok & ~rejected
  clipped = jnp.zeros_like(ok)
  if clip_norm > 0:
    delta, clipped = clip(delta, norms, part, clip_norm)
  plain = rule in ('mean', 'norm_outlier') and clip_norm <= 0 and noise_multiplier <= 0
  wp, pres_p = jnp.where(part, w, 0.0), jnp.where(part[:, None], pres, 0.0)
  leaves, treedef = jax.tree.flatten(delta)
  xs = [jnp.where(_bcast(part, x), x, 0.0) for x in jax.tree.leaves(tree)]
  keys = jax.random.split(noise_key, len(leaves))
  out = []
  for d, x, prev, m, key in zip(leaves, xs, jax.tree.leaves(previous), jax.tree.leaves(leaf_mod), keys):
    holds = pres[:, m] > 0 if (modality_aware and m >= 0) else jnp.ones_like(part)
    wl = jnp.where(holds, leaf_weights(wp, pres_p, m, modality_aware), 0.0)   # modality leaves: their holders
    if plain:   # the plain weighted mean of the uploads themselves
      out.append(weighted_mean(x, wl, prev))
      continue
    if rule in ('trimmed_mean', 'median'):
      holders = part & holds
      upd = median(d, holders) if rule == 'median' else trimmed_mean(d, holders, trim_fraction)
      total = holders.sum().astype(d.dtype)
    else:
      total = wl.sum()
      upd = weighted_mean(d, wl, jnp.zeros_like(prev))
      if noise_multiplier > 0:
        upd = dp.add_gaussian_noise(upd, wl, clip_norm, noise_multiplier, key)
    out.append(jnp.where(total > 0, prev + upd, prev))
  return AggregateOut(jax.tree.unflatten(treedef, out), part, uploaded & ~finite, rejected, clipped,
                      jnp.where(ok, norms, 0.0))
