"""Equal tuning budget for every method: random search (stratified by default) on the validation split.

Every tuned method gets the same number of trials (`tune.trials`) of the same length
(`tune.rounds`, or the grid's rounds when 0), with common random numbers: trial i of every
method has the same learning rate (one stream for the fields every method shares), and each
method's own knobs (FedProx's mu, the multimodal baseline's modality dropout, ML-ECS's MMA weighting and CCL /
SE-CCL weights and temperatures) are drawn on top from a stream of its own. A trial trains on
every tuning seed (`tune.seeds`, each the partition and the training seed, apart from the
grid's seeds) with a validation split cut from the clients' training data
(data.client_val_fraction) and is scored on it (eval.split='val'), never on the test data, by
the mean over the seeds of its last evaluations of (client + server) / 2 of the grid's headline
metric (grid.headline: ROUGE-LSum, or accuracy). The draws are stratified (tune.draw, `_draw`): with few
trials each still covers the whole range of every knob. Ablations are not tuned:
the grid gives them ML-ECS's values (studies.compare.grid.tuned_for).
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Callable

import ml_collections
import numpy as np

from studies.compare import grid as compare, stats
from ml_ecs.run import metrics_io
from ml_ecs.algorithms.registry import apply_strategy
from ml_ecs.config.validation import ConfigError

# dotted field -> ('log' | 'lin', low, high) or ('choice', options)
COMMON_SPACE = {'train.learning_rate': ('log', 3e-4, 1e-2)}
METHOD_SPACES = {
    'fedprox': {'method.fedprox_mu': ('log', 1e-3, 1.0)},
    'mmfl': {'method.modality_dropout': ('lin', 0.0, 0.5)},
    'ml_ecs': {'method.lambda_ccl': ('log', 0.01, 1.0), 'method.tau_ccl': ('log', 0.05, 1.0),
               'method.lambda_se_ccl': ('log', 0.05, 2.0), 'method.tau_se_ccl': ('log', 0.05, 1.0),
               # MMA's backbone weights: by samples (FedAvg), by modality count (the authors' code) or both;
               # chosen by the tuning like the other knobs, and stated in tuned.json
               'method.mma_backbone': ('choice', ('samples', 'modality', 'modality_samples'))},
}


def search_space(method: str) -> dict[str, tuple]:
  return {**COMMON_SPACE, **METHOD_SPACES.get(method, {})}


DRAWS = ('stratified', 'random')   # tune.draw


def _draw(space: dict[str, tuple], count: int, rng: np.random.Generator, draw: str = 'stratified') -> list[dict[str, Any]]:
  """`count` points of `space`. 'random': each field uniform on its (log) range. 'stratified' (a Latin
  hypercube): for each field the `count` points fall one in each of `count` equal slices of the range (and
  a choice takes each option equally often), in an order drawn at random, so that a few trials still span
  the range; four random draws of the learning rate once left its top third (above 2.8e-3) untried. `draw`
  is one of DRAWS (checked by `draw_kinds`, the one caller's source of it)."""
  fields = sorted(space)
  if draw == 'random':   # trial by trial, field by field: the stream the committed studies were drawn from
    us = dict(zip(fields, rng.random((count, len(fields))).T))
  else:
    us = {f: (rng.permutation(count) + rng.random(count)) / count for f in fields}
  trials = []
  for t in range(count):
    point: dict[str, Any] = {}
    for field, (kind, *bounds) in sorted(space.items()):
      u = float(us[field][t])
      if kind == 'choice':
        options = bounds[0]
        point[field] = options[min(int(u * len(options)), len(options) - 1)]
        continue
      lo, hi = bounds
      point[field] = float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if kind == 'log'
                           else lo + u * (hi - lo))
    trials.append(point)
  return trials


def draw_kinds(draw: str) -> list[str]:
  """The draws of tune.draw: one of DRAWS, or several joined by '+' ('random+stratified': `tune.trials`
  trials of each, in that order)."""
  kinds = str(draw).split('+')
  bad = [k for k in kinds if k not in DRAWS]
  if bad:
    raise ConfigError(f"tune.draw={draw!r}: expected one of {DRAWS}, or several joined by '+'")
  return kinds


def draw_trials(method: str, count: int, seed: int, draw: str = 'stratified') -> list[dict[str, Any]]:
  """`count` points of the method's search space per draw of tune.draw (`draw_kinds`; `_draw`: 'stratified'
  or 'random'): the common fields from one stream shared by every method (common random numbers), the
  method's own from its own stream (deterministic per seed). With 'random+stratified' the first `count`
  trials are the random draw's and the next `count` the stratified draw's, each exactly as drawn alone, so a
  study that ran one of them keeps its trials' numbers and directories."""
  trials = []
  for kind in draw_kinds(draw):
    common = _draw(COMMON_SPACE, count, np.random.default_rng([seed, 0]), kind)
    own = _draw(METHOD_SPACES.get(method, {}), count, np.random.default_rng([seed, 1, sum(map(ord, method))]), kind)
    trials += [{**c, **o} for c, o in zip(common, own)]
  return trials


def objective(rows: list[dict[str, Any]], last_k: int, headline: str = 'rougeLsum') -> float:
  """Mean of the last evaluations of (client + server) / 2 of the grid's headline metric (grid.headline)."""
  client, server = stats.headline_keys(rows, headline)
  return 0.5 * (stats.last_k_mean(rows, client, last_k) + stats.last_k_mean(rows, server, last_k))


def tuning_seeds(tune: ml_collections.ConfigDict) -> list[int]:
  """The tuning seeds (each a partition and a training seed)."""
  return compare._values('tune.seeds', tune.seeds, int)


def trial_config(base: ml_collections.ConfigDict, method: str, point: dict[str, Any],
                 seed: int) -> ml_collections.ConfigDict:
  """The run config of one trial on one tuning seed."""
  tune = base.tune
  cfg = apply_strategy(base, method)
  for key in ('grid', 'tune'):
    if key in cfg:
      del cfg[key]
  compare.set_fields(cfg, point)
  cfg.data.seed, cfg.seed = seed, seed
  cfg.data.modality_missing_rate = tune.missing_rate
  # the grid's (first) federation size, unless tune.num_clients names one
  cfg.data.num_clients = tune.get('num_clients', 0) or compare._values('num_clients', base.grid.num_clients, int)[0]
  cfg.data.modality_seed = base.grid.get('modality_seed', -1)
  cfg.eval.split = 'val'
  if tune.get('rounds', 0):          # the same (shorter) trial length for every method
    cfg.train.rounds = tune.rounds
  if not cfg.data.client_val_fraction:
    raise ValueError('tuning needs data.client_val_fraction > 0 (a validation split cut from training data)')
  return cfg


def trial_configs(base: ml_collections.ConfigDict) -> tuple[list[tuple[str, int, dict[str, Any], int]],
                                                              list[ml_collections.ConfigDict]]:
  """Every tuning run in order: (method, trial, point, seed) and its config."""
  tune = base.tune
  draw = tune.get('draw', 'stratified')
  trials = [(method, i, point, seed) for method in compare._values('tune.methods', tune.methods, str)
            for i, point in enumerate(draw_trials(method, tune.trials, tune.seed, draw))
            for seed in tuning_seeds(tune)]
  return trials, [trial_config(base, method, point, seed) for method, _, point, seed in trials]


def run_tuning(base: ml_collections.ConfigDict, workdir: str, train_fn: Callable,
               log: Callable[[str], None] = print, train_many: Callable | None = None) -> dict[str, Any] | None:
  """Runs (or resumes) every trial of every tuned method (`compare.run_jobs`: trials that differ only in
  seeds and continuous hyperparameters (`ml_ecs.core.runs.RUN_FIELDS`) run `grid.runs_per_program` at a time as one program); writes tuning.csv and,
  when all are done, tuned.json ({method: {'overrides', 'objective', 'trial'}}). Returns it, or None if
  stopped."""
  tune = base.tune
  trials, configs = trial_configs(base)
  per_method = tune.trials * len(draw_kinds(tune.get('draw', 'stratified')))
  dirs = [os.path.join(workdir, 'tuning', method, f't{i}__s{seed}__{compare.config_hash(cfg)}')
          for (method, i, _, seed), cfg in zip(trials, configs)]
  for (method, i, point, seed), d in zip(trials, dirs):
    if not os.path.exists(os.path.join(d, 'summary.json')):
      log(f'tuning {method} trial {i + 1}/{per_method}, seed {seed}: {point}')
  if not compare.run_jobs(configs, dirs, train_fn, train_many, int(base.grid.get('runs_per_program', 1)),
                          os.path.join(workdir, 'programs'), os.path.join(workdir, 'cache'), log, what='tuning'):
    return None
  scores: dict[tuple[str, int], list[float]] = {}
  for (method, i, _, _), d in zip(trials, dirs):
    scores.setdefault((method, i), []).append(
        objective(metrics_io.read_jsonl(os.path.join(d, 'metrics.jsonl')), base.grid.get('last_k', 3),
                  base.grid.get('headline', 'rougeLsum')))
  rows, best = [], {}
  points = {(method, i): point for method, i, point, _ in trials}
  for (method, i), values in scores.items():
    score = float(np.mean(values))
    rows.append({'method': method, 'trial': i, 'objective': score,
                 **{f'objective_s{s}': v for s, v in zip(tuning_seeds(tune), values)}, **points[(method, i)]})
    if method not in best or score > best[method]['objective']:
      best[method] = {'overrides': points[(method, i)], 'objective': score, 'trial': i}
  _write_csv(os.path.join(workdir, 'tuning.csv'), rows)
  metrics_io.write_json(os.path.join(workdir, 'tuned.json'), best)
  return best


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
  fields = list(dict.fromkeys(k for r in rows for k in r))
  tmp = metrics_io.temp_name(path)
  with open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)


if __name__ == '__main__':
  print(json.dumps({m: search_space(m) for m in ('fedavg', 'fedprox', 'mmfl', 'ml_ecs')}, indent=2))
