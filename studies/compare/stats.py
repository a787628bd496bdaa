"""Statistics of a comparison: the last evaluations of a run, intervals clustered on what was
randomised, and the Holm correction of the pre-registered contrasts.

What is randomised is the partition seed (the clients' data, modality sets, label skew); training seeds
are nested inside a partition. So the unit of an interval is the partition seed: the values of one
partition (its training seeds, each the mean over that run's clients) are averaged first, and the
interval is a Student-t interval over the partition means (`clustered_t`). scipy gives the t quantiles;
the clustering and the Holm step-down are a few lines each, written here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats


def evaluated(rows: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
  """The rows that hold `key` (evaluated rounds), in order."""
  return [r for r in rows if key in r]


HEADLINES = ('rougeLsum', 'accuracy')   # grid.headline: the pre-registered metric of contrasts and tuning


def headline_keys(rows: Sequence[Mapping[str, Any]], headline: str = 'rougeLsum') -> tuple[str, str]:
  """(client, server) headline keys the runs hold: for 'rougeLsum' multi-reference ROUGE-LSum, else
  single-reference; for 'accuracy' the answer accuracy."""
  if headline not in HEADLINES:
    raise ValueError(f'grid.headline={headline!r}: expected one of {HEADLINES}')
  if headline == 'accuracy':
    return 'client/accuracy_mean', 'server/accuracy'
  if evaluated(rows, 'client/rougeLsum_multi_mean'):
    return 'client/rougeLsum_multi_mean', 'server/rougeLsum_multi'
  return 'client/rougeLsum_mean', 'server/rougeLsum'


def last_k_mean(rows: Sequence[Mapping[str, Any]], key: str, k: int = 3) -> Any:
  """Mean of `key` over the last k evaluations: a float, or a dict {client: mean} for per-client keys."""
  vals = [r[key] for r in evaluated(rows, key)][-k:]
  if not vals:
    raise ValueError(f'no evaluated row holds {key!r}')
  if isinstance(vals[0], Mapping):
    return {c: float(np.mean([v[c] for v in vals])) for c in vals[0]}
  return float(np.mean(vals))


def clustered_t(values: Mapping[Any, Sequence[float]], level: float = 0.95) -> dict[str, float]:
  """Mean and Student-t interval of the mean over clusters, with a two-sided p-value against 0.

  values[cluster]: the values of one cluster (e.g. one partition seed's runs, each a mean over its clients);
  each cluster counts once (its values are averaged first). With fewer than 2 clusters lo, hi, p are NaN.
  """
  means = np.array([np.mean(v) for v in values.values() if len(v)], float)
  if not len(means):
    raise ValueError('clustered_t needs at least one non-empty cluster')
  n, mean = len(means), float(means.mean())
  out = {'mean': mean, 'lo': float('nan'), 'hi': float('nan'), 'p': float('nan'), 'clusters': n,
         'n': int(sum(len(v) for v in values.values()))}
  if n < 2:
    return out
  se = float(means.std(ddof=1) / np.sqrt(n))
  if se <= 1e-12 * max(1.0, abs(mean)):   # every cluster the same: no spread to test against
    return {**out, 'lo': mean, 'hi': mean, 'p': 0.0 if mean != 0 else 1.0}
  half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * se
  p = 2 * float(scipy_stats.t.sf(abs(mean) / se, n - 1))
  return {**out, 'lo': mean - half, 'hi': mean + half, 'p': p}


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
  """Holm-adjusted p-values (step-down, family-wise error) of a family of contrasts; NaN stays NaN."""
  named = sorted(((p, k) for k, p in pvalues.items() if not np.isnan(p)))
  m, out, running = len(named), {k: float('nan') for k in pvalues}, 0.0
  for i, (p, k) in enumerate(named):
    running = max(running, min(1.0, (m - i) * p))
    out[k] = running
  return out
