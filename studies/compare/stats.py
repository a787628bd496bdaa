"""Statistics of a comparison: the last evaluations of a run, plateaus, paired bootstrap intervals.

The bootstrap is written here (not scipy.stats.bootstrap) because the unit that is resampled
is a run (one partition seed x training seed), while the statistic averages the per-client
differences inside the resampled runs: a cluster bootstrap, which scipy does not offer.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def evaluated(rows: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
  """The rows that hold `key` (evaluated rounds), in order."""
  return [r for r in rows if key in r]


def headline_keys(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
  """(client, server) headline ROUGE-LSum keys the runs hold: multi-reference, else single-reference."""
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


def plateau(rows: Sequence[Mapping[str, Any]], key: str, k: int = 3) -> float:
  """Mean of the last k evaluations minus the mean of the k before (NaN if fewer than 2k): how
  much the metric still moved at the end of the run."""
  vals = [float(r[key]) for r in evaluated(rows, key)]
  if len(vals) < 2 * k:
    return float('nan')
  return float(np.mean(vals[-k:]) - np.mean(vals[-2 * k:-k]))


def cluster_bootstrap_ci(units: Sequence[Sequence[float]], num_resamples: int = 10000, level: float = 0.95,
                         seed: int = 0) -> dict[str, float]:
  """Percentile CI of the mean of all values, resampling whole units (runs) with replacement.

  units[u]: the values of run u (e.g. per-client differences of two methods on the same
  partition and training seed). Returns mean, lo, hi, the number of units and of values.
  """
  units = [np.asarray(u, float) for u in units if len(u)]
  if not units:
    raise ValueError('cluster_bootstrap_ci needs at least one non-empty unit')
  sums = np.array([u.sum() for u in units])
  counts = np.array([len(u) for u in units])
  mean = float(sums.sum() / counts.sum())
  if len(units) < 2:
    return {'mean': mean, 'lo': float('nan'), 'hi': float('nan'), 'units': 1, 'n': int(counts.sum())}
  rng = np.random.default_rng(seed)
  pick = rng.integers(0, len(units), (num_resamples, len(units)))
  stats = sums[pick].sum(1) / counts[pick].sum(1)
  lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
  return {'mean': mean, 'lo': float(lo), 'hi': float(hi), 'units': len(units), 'n': int(counts.sum())}
