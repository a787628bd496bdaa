"""The comparison protocol: a resumable grid of runs, its statistics, and a reproduction check.

Cells are method x missing rate x clients x partition seed x training seed. A cell's
directory is named by its settings and a hash of its resolved config, so a changed
setting never reuses a stale result; a cell interrupted mid-run resumes from its own
checkpoint (ml_ecs.run.trainer), and a finished cell (summary.json) is not rerun.

Each cell is scored by the mean of its last `grid.last_k` evaluations (not one point).
results.md gives, per setting, every method's mean with a 95% bootstrap interval over
runs, and each method's paired difference to the best baseline of that setting: client
side per client (pairs on the same partition, training seed and client; the bootstrap
resamples whole runs), server side per run. Tuned hyperparameters (studies.compare.tuning) are
applied per method; ablations use ML-ECS's. Every invocation appends its environment to
environment.jsonl; `reproduce` reruns finished cells and records whether they match.
"""
from __future__ import annotations

import csv
import fnmatch
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Callable

import ml_collections
import numpy as np

from ml_ecs.run import environment, metrics_io, report
from studies.compare import stats
from ml_ecs.algorithms import registry
from ml_ecs.algorithms.registry import STRATEGIES, apply_strategy
from ml_ecs.config.validation import ConfigError, validate
from ml_ecs.config.identity import identity_json
from ml_ecs.core import runs as runs_lib

# Fixed before the grid runs (grid.contrasts / grid.reference override them): the family of confirmatory
# contrasts, Holm-corrected together, and the reference baseline of the exploratory differences.
CONTRASTS = (('ml_ecs', 'local'), ('ml_ecs', 'fedavg'))
REFERENCE = 'fedavg'
# (results field, metrics key, header): the headline metrics, where the runs hold them.
METRICS = (('client_rougeLsum_multi', 'client/rougeLsum_multi_mean', 'client ROUGE-LSum multi-ref'),
           ('client_rougeLsum', 'client/rougeLsum_mean', 'client ROUGE-LSum'),
           ('client_accuracy', 'client/accuracy_mean', 'client acc'),
           ('client_global_rougeLsum_multi', 'client/global_rougeLsum_multi_mean', 'global model ROUGE-LSum multi-ref'),
           ('server_rougeLsum_multi', 'server/rougeLsum_multi', 'server ROUGE-LSum multi-ref'),
           ('server_rougeLsum', 'server/rougeLsum', 'server ROUGE-LSum'),
           ('server_accuracy', 'server/accuracy', 'server acc'),
           # whether the LMs write answers at all: the share that are a class sentence word for word
           ('client_sentence', 'client/sentence_mean', 'client sentence rate'),
           ('server_sentence', 'server/sentence', 'server sentence rate'))
PER_CLIENT = (('client_rougeLsum_multi_by_client', 'client/rougeLsum_multi'),
              ('client_rougeLsum_by_client', 'client/rougeLsum'), ('client_accuracy_by_client', 'client/accuracy'))
# Constant answers scored on each cell's own test windows (summary.json 'floors', ml_ecs.core.evaluate.floors).
FLOORS = tuple((f'floor_{side}_{answer}_{score}', f'floor/{side}/{answer}_{score}')
               for side in ('client', 'server') for answer in ('the', 'majority')
               for score in ('rougeLsum_multi', 'accuracy'))
# Mechanism telemetry (metrics.jsonl, per training round), keys or key patterns: SE-CCL (client uploads the server
# aligned to; share of sampled clients that aligned to the server), CCL (anchored rows per client / server batch),
# AMT (gates of the shared and the private LoRA), MMA (per modality, the clients in its aggregate and their total
# weight). A cell records each key's mean over its rounds and the share of rounds in which it was above 0 ('fired').
TELEMETRY = ('server/se_ccl_clients', 'client/se_ccl_used', 'client/private_ccl_anchors', 'server/ccl_anchors',
             'client/gate_shared', 'client/gate_private', 'mma/*_clients', 'mma/*_weight')
CSV_FIELDS = (('method', 'missing_rate', 'num_clients', 'partition_seed', 'train_seed', 'cell')
              + tuple(f for f, _, _ in METRICS) + tuple(f for f, _ in PER_CLIENT) + tuple(f for f, _ in FLOORS)
              + ('final_client_rougeLsum', 'final_server_rougeLsum', 'comm_ratio', 'rounds', 'wall_s', 'telemetry',
                 'client_modalities'))

Cell = tuple[str, float, int, int, int]   # method, missing rate, clients, partition seed, training seed


def _values(field: str, value, cast) -> list:
  """A grid axis from a tuple or a comma-separated string (as typed on the command line)."""
  items = value if isinstance(value, (tuple, list)) else [value]
  items = [p for v in items for p in (v.split(',') if isinstance(v, str) else [v])]
  try:
    out = [cast(v.strip() if isinstance(v, str) else v) for v in items if str(v).strip()]
  except ValueError:
    raise ValueError(f'grid.{field}={value!r}: expected a comma-separated list of {cast.__name__}') from None
  if not out:
    raise ValueError(f'grid.{field} is empty')
  return out


def check_grid(base: ml_collections.ConfigDict) -> tuple[list[Cell], list[ml_collections.ConfigDict]]:
  """Every cell and its validated config (tuned values applied), before any cell runs; ConfigError
  names the grid field or the cell."""
  try:
    unknown = [m for m in _values('methods', base.grid.methods, str) if m not in STRATEGIES]
    if unknown:
      raise ValueError(f'grid.methods has unknown methods {unknown}: expected names from {sorted(STRATEGIES)}')
    todo = cells(base.grid)
    methods = {c[0] for c in todo}
    opts = report_options(base.grid)
    named = {m for pair in opts['contrasts'] for m in pair} | {opts['reference']}
    if any(len(pair) != 2 for pair in opts['contrasts']) or not named <= set(STRATEGIES):
      raise ValueError(f"grid.contrasts={base.grid.get('contrasts')!r} / grid.reference={opts['reference']!r}: "
                       f"expected 'method-baseline' pairs and a reference from {sorted(STRATEGIES)}")
    if opts['headline'] not in stats.HEADLINES:
      raise ValueError(f"grid.headline={opts['headline']!r}: expected one of {stats.HEADLINES}")
    if not (named & methods):
      raise ValueError(f'grid.contrasts / grid.reference name none of grid.methods {sorted(methods)}')
    for field, low, note in (('runs_per_program', 1, '1: one cell at a time'), ('run_devices', 1, ''),
                             ('run_batch', 0, "0: the platform's default")):
      value = base.grid.get(field, low)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f'grid.{field}={value!r}: expected an integer >= {low}' + (f' ({note})' if note else ''))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  tuned = tuned_values(base.grid)
  configs = []
  for cell in todo:
    cfg = cell_config(base, cell, tuned)
    try:
      configs.append(validate(cfg))
    except ConfigError as e:
      raise ConfigError(f'cell {cell_name(*cell)}: {e}') from None
  return todo, configs


def cells(grid: ml_collections.ConfigDict) -> list[Cell]:
  """Every (method, missing rate, clients, partition seed, training seed) of the grid; a method named in
  grid.train_seeds_for runs only the training seeds given there (e.g. ablations on one training seed)."""
  seeds = _values('train_seeds', grid.train_seeds, int)
  per_method = {m: _values(f'train_seeds_for.{m}', v, int) for m, v in (grid.get('train_seeds_for') or {}).items()}
  methods = _values('methods', grid.methods, str)
  unknown = sorted(set(per_method) - set(methods))
  if unknown:
    raise ValueError(f'grid.train_seeds_for names methods {unknown} that grid.methods={methods} does not run')
  return [cell for cell in itertools.product(
      methods, _values('missing_rates', grid.missing_rates, float), _values('num_clients', grid.num_clients, int),
      _values('partition_seeds', grid.partition_seeds, int), seeds)
      if cell[4] in per_method.get(cell[0], seeds)]


def setting_key(rate: float, clients: int) -> str:
  """The name of a grid setting (missing rate, clients), as headroom.json keys it."""
  return f'mr{rate:g}__c{clients}'


def cell_name(method: str, rate: float, clients: int, partition_seed: int, train_seed: int) -> str:
  return f'{method}__mr{rate:g}__c{clients}__p{partition_seed}__t{train_seed}'


def config_hash(cfg: ml_collections.ConfigDict) -> str:
  return hashlib.sha1(identity_json(cfg).encode()).hexdigest()[:8]


def cell_dir(workdir: str, cell: Cell, cfg: ml_collections.ConfigDict) -> str:
  """The cell's run directory: settings plus a hash of the resolved config."""
  return os.path.join(workdir, 'cells', f'{cell_name(*cell)}__{config_hash(cfg)}')


def tuned_values(grid: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """{method: {dotted field: value}} from grid.tuned (a tuned.json of studies.compare.tuning), or {}."""
  path = grid.get('tuned', '')
  if not path:
    return {}
  if not os.path.exists(path):
    raise FileNotFoundError(f'grid.tuned={path!r}: no such file (run the tuning first: studies.compare.tuning)')
  with open(path) as f:
    return {m: v['overrides'] for m, v in json.load(f).items()}


def tuned_for(method: str, tuned: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """A method's tuned overrides; ablations use ML-ECS's, but for the fields that remove their component (a
  tuned MMA weighting must not return to the no-MMA ablation)."""
  if method in tuned:
    return tuned[method]
  if method.startswith('ml_ecs_no_') and 'ml_ecs' in tuned:   # except the fields the ablation itself sets
    removed = getattr(registry.get(method), 'changes', {})
    return {k: v for k, v in tuned['ml_ecs'].items() if k.removeprefix('method.') not in removed}
  return {}


def set_fields(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  """cfg[dotted field] = value for each override."""
  for field, value in overrides.items():
    *path, leaf = field.split('.')
    node = cfg
    for p in path:
      node = node[p]
    node[leaf] = value


def cell_config(base: ml_collections.ConfigDict, cell: Cell, tuned: dict[str, dict[str, Any]] | None = None):
  """The run config of one cell: the method's strategy and tuned values on the base config."""
  method, rate, clients, partition_seed, train_seed = cell
  cfg = apply_strategy(base, method)
  grid = cfg.grid
  del cfg['grid']
  if 'tune' in cfg:   # the tuning's settings are not the run's (a cell's hash must not move with them)
    del cfg['tune']
  set_fields(cfg, tuned_for(method, tuned or {}))
  cfg.data.modality_missing_rate = rate
  cfg.data.num_clients = clients
  cfg.data.num_device_types = min(cfg.data.num_device_types, clients)
  cfg.data.seed = partition_seed
  cfg.data.modality_seed = grid.get('modality_seed', -1)
  cfg.seed = train_seed
  return cfg


def cell_row(cell: Cell, name: str, rows: list[dict], timings: list[dict], last_k: int,
             floors: dict[str, float] | None = None, clients_json: list[dict] | None = None) -> dict[str, Any]:
  """The results row of a finished cell (`name`: its directory name under cells/; `floors`: its
  summary.json's constant-answer floors, '' where a cell predates them; `clients_json`: its clients.json, for
  each client's modality set)."""
  method, rate, clients, partition_seed, train_seed = cell
  final = stats.evaluated(rows, 'client/rougeLsum_mean')[-1]
  out = {'method': method, 'missing_rate': rate, 'num_clients': clients, 'partition_seed': partition_seed,
         'train_seed': train_seed, 'cell': name}
  for field, key, _ in METRICS:
    out[field] = stats.last_k_mean(rows, key, last_k) if stats.evaluated(rows, key) else ''
  for field, key in PER_CLIENT:
    out[field] = json.dumps(stats.last_k_mean(rows, key, last_k), sort_keys=True) if stats.evaluated(rows, key) else ''
  out.update(final_client_rougeLsum=final['client/rougeLsum_mean'], final_server_rougeLsum=final['server/rougeLsum'],
             comm_ratio=max((r.get('comm/ratio', 0.0) for r in rows), default=0.0), rounds=final['round'],
             wall_s=max((t.get('time/elapsed_s', 0.0) for t in timings), default=float('nan')))
  out.update({field: (floors or {}).get(key, '') for field, key in FLOORS})
  out['telemetry'] = json.dumps(telemetry(rows), sort_keys=True)
  out['client_modalities'] = json.dumps({str(c['client_id']): '+'.join(c['modalities']) for c in clients_json},
                                        sort_keys=True) if clients_json else ''
  return out


def telemetry(rows: list[dict]) -> dict[str, dict[str, float]]:
  """{key: {'mean': mean over the training rounds, 'fired': share of rounds with a value > 0}} of the TELEMETRY
  keys a run's metrics hold (a mechanism that is off or never fires reads fired = 0)."""
  trained = [r for r in rows if r.get('round', 0) > 0]
  keys = sorted({k for r in trained for k, v in r.items() if isinstance(v, (int, float))
                 and any(fnmatch.fnmatchcase(k, t) for t in TELEMETRY)})
  out = {}
  for k in keys:
    vals = np.array([float(r[k]) for r in trained if k in r], float)
    vals = vals[np.isfinite(vals)]
    if len(vals):
      out[k] = {'mean': float(vals.mean()), 'fired': float((vals > 0).mean())}
  return out


def _record_environment(workdir: str, what: str) -> None:
  path = os.path.join(workdir, 'environment.jsonl')
  rows = metrics_io.read_jsonl(path) if os.path.exists(path) else []
  metrics_io.write_jsonl(path, rows + [{'stage': what, **environment.environment()}])


def program_groups(configs: Sequence[ml_collections.ConfigDict], size: int) -> list[list[int]]:
  """Positions of `configs` in groups of at most `size` whose configs differ only in the fields a program
  of runs may vary (`ml_ecs.core.runs.RUN_FIELDS`), ordered by their first position."""
  groups: dict[str, list[list[int]]] = {}
  for i, cfg in enumerate(configs):
    chunks = groups.setdefault(runs_lib.program_key(cfg), [[]])
    if len(chunks[-1]) == size:
      chunks.append([])
    chunks[-1].append(i)
  return sorted((g for chunks in groups.values() for g in chunks), key=lambda g: g[0])


def run_jobs(configs: Sequence[ml_collections.ConfigDict], dirs: Sequence[str], train_fn: Callable,
             train_many: Callable | None, per_program: int, programs_dir: str, cache: str,
             log: Callable[[str], None] = print, deadline: float | None = None,
             on_done: Callable[[list[int]], None] | None = None, what: str = 'grid') -> bool:
  """Runs the runs (config, run directory) not yet finished; True when every one is.

  `train_fn(cfg, dir, cache)` runs one and returns whether it finished (False: interrupted, e.g. by
  SIGTERM: nothing more starts). With `per_program` = k > 1 and `train_many(cfgs, dirs, program_dir,
  cache)`, up to k unfinished runs that differ only in seeds and tuned hyperparameters (learning rate, loss
  weights and temperatures, modality dropout, MMA weighting: `ml_ecs.core.runs.RUN_FIELDS`) run as one program
  (ml_ecs.core.runs, `program_groups`); a group whose runs turn out to differ in structure runs one by
  one. Nothing new starts after `deadline` (time.time()). `on_done(positions)` after each finished group;
  `what` names the stage in the log.
  """
  pending = [i for i, d in enumerate(dirs) if not os.path.exists(os.path.join(d, 'summary.json'))]
  if per_program > 1 and train_many is not None:
    groups = [[pending[j] for j in g] for g in program_groups([configs[i] for i in pending], per_program)]
  else:
    groups = [[i] for i in pending]
  for group in groups:
    names = [os.path.basename(dirs[i]) for i in group]
    if deadline is not None and time.time() > deadline:
      log(f'time budget spent before {names[0]}; rerun the same command to go on')
      return False
    log(f'{", ".join(names)}: running' + (f' as one program of {len(group)} runs' if len(group) > 1 else ''))
    if len(group) > 1:
      program = os.path.join(programs_dir, hashlib.sha1(' '.join(dirs[i] for i in group).encode()).hexdigest()[:10])
      try:
        ok = train_many([configs[i] for i in group], [dirs[i] for i in group], program, cache)
      except runs_lib.DifferentStructure as e:
        log(f'  {e}; running them one by one')
        ok = all(train_fn(configs[i], dirs[i], cache) for i in group)
    else:
      ok = train_fn(configs[group[0]], dirs[group[0]], cache)
    if not ok:
      log(f'{what} stopped in {names[0]}; rerun the same command to resume')
      return False
    if on_done is not None:
      on_done(group)
  return True


def run_grid(base: ml_collections.ConfigDict, workdir: str, train_fn: Callable, log: Callable[[str], None] = print,
             progress: bool = False, deadline: float | None = None,
             train_many: Callable | None = None) -> list[dict[str, Any]]:
  """Runs (or resumes) every cell not yet finished (`run_jobs`: `train_fn` per cell, or `train_many` for
  cells that differ only in seeds, `grid.runs_per_program` at a time), writing the reports after each.
  `progress`: a bar over the cells with an ETA. Returns the finished cells' rows in grid order.
  """
  from tqdm import tqdm
  todo, configs = check_grid(base)
  os.makedirs(workdir, exist_ok=True)
  _record_environment(workdir, 'grid')
  last_k = base.grid.get('last_k', 3)
  dirs = [cell_dir(workdir, cell, cfg) for cell, cfg in zip(todo, configs)]
  rows: dict[int, dict[str, Any]] = {}

  def collect(i):
    timing_path = os.path.join(dirs[i], 'timing.jsonl')
    with open(os.path.join(dirs[i], 'summary.json')) as f:
      floors = json.load(f).get('floors')
    clients_path = os.path.join(dirs[i], 'clients.json')
    clients = json.load(open(clients_path)) if os.path.exists(clients_path) else None
    rows[i] = cell_row(todo[i], os.path.basename(dirs[i]), metrics_io.read_jsonl(os.path.join(dirs[i], 'metrics.jsonl')),
                       metrics_io.read_jsonl(timing_path) if os.path.exists(timing_path) else [], last_k, floors,
                       clients)

  for i, d in enumerate(dirs):
    if os.path.exists(os.path.join(d, 'summary.json')):
      collect(i)
  if rows:
    log(f'{len(rows)} of {len(todo)} cells finished earlier')
  results = lambda: [rows[i] for i in sorted(rows)]
  bar = tqdm(total=len(todo) - len(rows), desc='grid', unit='cell', disable=not progress, dynamic_ncols=True)

  def done(group):
    for i in group:
      collect(i)
    bar.update(len(group))
    write_reports(results(), workdir, base.grid)

  try:
    run_jobs(configs, dirs, train_fn, train_many, int(base.grid.get('runs_per_program', 1)),
             os.path.join(workdir, 'programs'), os.path.join(workdir, 'cache'), log, deadline, done)
  finally:
    bar.close()
  if rows:
    write_reports(results(), workdir, base.grid)
  return results()


def _numbers(x: Any, path: str = '') -> dict[str, float]:
  """The numeric leaves of a metrics row, flattened to {path: value} (lists and nested dicts included)."""
  if isinstance(x, bool):
    return {}
  if isinstance(x, (int, float)):
    return {path: float(x)}
  items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
  return {k: v for key, item in items for k, v in _numbers(item, f'{path}/{key}').items()}


def metric_differences(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]],
                       drift: float = 1e-3) -> dict[str, Any]:
  """How far two metrics.jsonl of one run lie apart: the largest absolute difference over every numeric
  value of every row (and which), whether the rows and their keys agree at all, and the first round where
  some value differs by more than `drift` relative to its size (None: never; float rounding that grew into
  a visible difference)."""
  worst, where, first = 0.0, '', None
  same_keys = len(a) == len(b) and all(set(_numbers(x)) == set(_numbers(y)) for x, y in zip(a, b))
  for x, y in zip(a, b):
    nx, ny = _numbers(x), _numbers(y)
    for k in nx.keys() & ny.keys():
      d = abs(nx[k] - ny[k])
      if d > worst or math.isnan(d):
        worst, where = d, f"round {x.get('round')}: {k.lstrip('/')}"
      if first is None and not d <= drift * max(abs(nx[k]), abs(ny[k]), 1e-12):
        first = x.get('round')
  return {'same_rows': same_keys, 'worst_abs_diff': worst, 'worst_at': where, 'drift_from_round': first}


def _program_of(cdir: str, position: dict[str, int], groups: list[list[int]]
                ) -> tuple[list[int], str, int | None]:
  """The grid positions of the runs that ran as one program with the cell in `cdir` (itself alone if it ran
  as a single run), how that is known (the run's program.json, else the grid's grouping of all its cells: what
  an uninterrupted grid runs), and how many runs the program computed at once: program.json's `run_batch`, all
  of them where program.json predates that field (programs were vmapped then), None where unknown."""
  path = os.path.join(cdir, 'program.json')
  name = os.path.basename(cdir)
  if os.path.exists(path):
    with open(path) as f:
      found = json.load(f)
    members = found['members']
    missing = [m for m in members if m not in position]
    if missing:
      raise ValueError(f'{path}: names runs {missing} that are not cells of this grid')
    return [position[m] for m in members], 'program.json', int(found.get('run_batch', len(members)))
  return next(g for g in groups if position[name] in g), 'grid order', None


def _rerun_record(cell: str, mode: str, a: list[dict], b: list[dict], headline: str, last_k: int) -> dict[str, Any]:
  client_key, server_key = stats.headline_keys(a, headline)
  ca, cb = (stats.last_k_mean(x, client_key, last_k) for x in (a, b))
  sa, sb = (stats.last_k_mean(x, server_key, last_k) for x in (a, b))
  return {'cell': cell, 'rerun': mode, 'identical': a == b, **metric_differences(a, b), 'client_metric': client_key,
          'client_original': ca, 'client_rerun': cb, 'server_metric': server_key, 'server_original': sa,
          'server_rerun': sb, 'abs_diff': abs(ca - cb)}


def repro_picks(done: Sequence[int], count: int) -> list[int]:
  """The `count` finished cells (of the positions `done`) that the reproduction check reruns: spread evenly
  over the grid, the first and the last included."""
  return [done[int(round(i * (len(done) - 1) / max(count - 1, 1)))] for i in range(min(count, len(done)))]


def reproduce(base: ml_collections.ConfigDict, workdir: str, train_fn: Callable, count: int = 3,
              log: Callable[[str], None] = print, train_many: Callable | None = None) -> list[dict[str, Any]]:
  """Reruns `count` finished cells (spread over the grid) from scratch and records how each rerun's
  metrics.jsonl compares with the grid's (repro.json): identical or not, the largest difference of any
  value, the round from which float rounding grew into a visible difference, and both headline scores.

  A cell is rerun as it ran. A cell from a program of runs (grid.runs_per_program) is reproduced by
  rerunning that program, with the same runs in the same places, computing as many at once as it did
  (repro_program/, with `train_many`), and is also rerun as a single run (repro/): the program rounds some sums
  differently, so that second
  rerun measures how far float rounding alone moves the cell, not whether it reproduces. Returns the
  records."""
  todo, configs = check_grid(base)
  dirs = [cell_dir(workdir, cell, cfg) for cell, cfg in zip(todo, configs)]
  done = [i for i, d in enumerate(dirs) if os.path.exists(os.path.join(d, 'summary.json'))]
  if not done:
    raise ValueError(f'{workdir}: no finished cell to reproduce')
  picks = repro_picks(done, count)
  position = {os.path.basename(d): i for i, d in enumerate(dirs)}
  per_program = int(base.grid.get('runs_per_program', 1))
  groups = program_groups(configs, per_program) if per_program > 1 else [[i] for i in range(len(dirs))]
  path = os.path.join(workdir, 'repro.json')
  records = {(r['cell'], r.get('rerun', 'single run')): r
             for r in (json.load(open(path)) if os.path.exists(path) else [])}
  _record_environment(workdir, 'reproduce')
  last_k, headline = base.grid.get('last_k', 3), base.grid.get('headline', 'rougeLsum')
  read = lambda d: metrics_io.read_jsonl(os.path.join(d, 'metrics.jsonl'))
  finished = lambda d: os.path.exists(os.path.join(d, 'summary.json'))
  for i in picks:
    name = os.path.basename(dirs[i])
    members, known_by, batch = _program_of(dirs[i], position, groups) if train_many is not None else ([i], '', None)
    if len(members) > 1 and (name, f'program of {len(members)}') not in records:
      rdirs = [os.path.join(workdir, 'repro_program', os.path.basename(dirs[j])) for j in members]
      if not all(map(finished, rdirs)):
        if any(map(finished, rdirs)):
          raise ValueError(f'{os.path.join(workdir, "repro_program")}: some runs of the program of {name} finished '
                           'without the others; remove them to rerun the program')
        log(f'reproducing {name} by rerunning its program of {len(members)} runs (known from {known_by})')
        program = os.path.join(workdir, 'repro_program', 'programs',
                               hashlib.sha1(' '.join(rdirs).encode()).hexdigest()[:10])
        if not train_many([configs[j] for j in members], rdirs, program, os.path.join(workdir, 'cache'),
                          run_batch=batch):
          break
      grid_rows, rerun_rows = [read(dirs[j]) for j in members], [read(r) for r in rdirs]
      at = members.index(i)
      rec = _rerun_record(name, f'program of {len(members)}', grid_rows[at], rerun_rows[at], headline, last_k)
      rec['program_identical'] = sum(a == b for a, b in zip(grid_rows, rerun_rows))
      rec['program_known_by'] = known_by
      records[(name, rec['rerun'])] = rec
      metrics_io.write_json(path, list(records.values()))
    if (name, 'single run') in records:
      continue
    rdir = os.path.join(workdir, 'repro', name)
    if os.path.exists(rdir) and not finished(rdir):
      shutil.rmtree(rdir)
    log(f'reproducing {name} as a single run')
    if not train_fn(configs[i], rdir, os.path.join(workdir, 'cache')):
      break
    records[(name, 'single run')] = _rerun_record(name, 'single run', read(dirs[i]), read(rdir), headline, last_k)
    metrics_io.write_json(path, list(records.values()))
  return list(records.values())


def write_reports(results: list[dict[str, Any]], workdir: str, grid: ml_collections.ConfigDict | None = None) -> None:
  """results.csv, results.md (with the grid's pre-registered contrasts and reference) and the two plots
  (atomically replaced)."""
  tmp = metrics_io.temp_name(os.path.join(workdir, 'results.csv'))
  with open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    w.writeheader()
    w.writerows(results)
  os.replace(tmp, os.path.join(workdir, 'results.csv'))
  repro_path = os.path.join(workdir, 'repro.json')
  repro = json.load(open(repro_path)) if os.path.exists(repro_path) else []
  headroom_path = os.path.join(workdir, 'headroom.json')
  headroom = json.load(open(headroom_path)) if os.path.exists(headroom_path) else None
  tmp = metrics_io.temp_name(os.path.join(workdir, 'results.md'))
  with open(tmp, 'w') as f:
    f.write(markdown_report(results, repro, headroom=headroom, **report_options(grid)))
  os.replace(tmp, os.path.join(workdir, 'results.md'))
  report.report_grid(workdir, out_dir=workdir)


# ---------------------------------------------------------------------------- statistics
def _present(results: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
  return [m for m in METRICS if any(r.get(m[0]) not in ('', None) for r in results)]


def _fmt_ci(ci: dict[str, float], signed: bool = False) -> str:
  f = (lambda x: f'{x:+.3f}') if signed else (lambda x: f'{x:.3f}')
  if math.isnan(ci['lo']):
    return f"{f(ci['mean'])} (n={ci['clusters']})"
  return f"{f(ci['mean'])} [{f(ci['lo'])}, {f(ci['hi'])}]"


def _fmt_p(p: float) -> str:
  return '—' if math.isnan(p) else (f'{p:.3f}' if p >= 1e-3 else f'{p:.1e}')


def _run_key(r: dict[str, Any]) -> tuple[int, int]:
  return int(r['partition_seed']), int(r['train_seed'])


def by_partition(results: list[dict[str, Any]], method: str, field: str) -> dict[int, list[float]]:
  """{partition seed: the field's value of each of the method's runs on it}."""
  out: dict[int, list[float]] = defaultdict(list)
  for r in results:
    if r['method'] == method and r.get(field) not in ('', None):
      out[int(r['partition_seed'])].append(float(r[field]))
  return dict(out)


def paired_difference(results: list[dict[str, Any]], method: str, baseline: str, field: str,
                      per_client_field: str | None = None, level: float = 0.95,
                      modalities: str | None = None) -> dict[str, float] | None:
  """method - baseline on the runs both have, clustered on the partition seed (`stats.clustered_t`).

  A run's difference is paired on the same partition and training seed: with `per_client_field` the
  mean over its clients of the per-client differences, else the difference of the run values. With
  `modalities` (e.g. 'accel+depth'), only the clients holding that modality set (the row's
  client_modalities).
  """
  a = {_run_key(r): r for r in results if r['method'] == method}
  b = {_run_key(r): r for r in results if r['method'] == baseline}
  clusters: dict[int, list[float]] = defaultdict(list)
  for key in sorted(set(a) & set(b)):
    if per_client_field and a[key].get(per_client_field) and b[key].get(per_client_field):
      ca, cb = json.loads(a[key][per_client_field]), json.loads(b[key][per_client_field])
      held = json.loads(a[key].get('client_modalities') or '{}')
      diffs = [ca[c] - cb[c] for c in sorted(set(ca) & set(cb), key=int)
               if modalities is None or held.get(c) == modalities]
      if diffs:
        clusters[key[0]].append(float(np.mean(diffs)))
    elif not per_client_field and a[key].get(field) not in ('', None) and b[key].get(field) not in ('', None):
      clusters[key[0]].append(float(a[key][field]) - float(b[key][field]))
  return stats.clustered_t(clusters, level) if clusters else None


def _headline_fields(metrics, headline: str = 'rougeLsum') -> tuple[str, str, str]:
  """(client field, its per-client field, server field) of the headline metric (grid.headline) the results hold."""
  if headline == 'accuracy':
    return 'client_accuracy', 'client_accuracy_by_client', 'server_accuracy'
  fields = {f for f, _, _ in metrics}
  if 'client_rougeLsum_multi' in fields:
    return 'client_rougeLsum_multi', 'client_rougeLsum_multi_by_client', 'server_rougeLsum_multi'
  return 'client_rougeLsum', 'client_rougeLsum_by_client', 'server_rougeLsum'


def contrast_rows(results: list[dict[str, Any]], contrasts: Sequence[tuple[str, str]],
                  level: float = 0.95, headline: str = 'rougeLsum') -> list[dict[str, Any]]:
  """The pre-registered contrasts (method, baseline) on the clients' and the server's headline metric,
  each clustered on the partition seed, with Holm-adjusted p-values over the whole family."""
  client, per_client, server = _headline_fields(_present(results), headline)
  rows = []
  for method, baseline in contrasts:
    for side, d in (('client', paired_difference(results, method, baseline, client, per_client, level)),
                    ('server', paired_difference(results, method, baseline, server, None, level))):
      if d is not None:
        rows.append({'contrast': f'{method} - {baseline}', 'side': side, **d})
  adjusted = stats.holm({str(i): r['p'] for i, r in enumerate(rows)})
  for i, r in enumerate(rows):
    r['p_holm'] = adjusted[str(i)]
  return rows


def report_options(grid: ml_collections.ConfigDict | None) -> dict[str, Any]:
  """The contrasts and reference baseline a grid config fixes (the defaults where it names none)."""
  grid = grid or {}
  contrasts = grid.get('contrasts', CONTRASTS)
  return {'contrasts': tuple(tuple(c.split('-')) if isinstance(c, str) else tuple(c) for c in contrasts),
          'reference': grid.get('reference', REFERENCE), 'design': grid.get('design', ''),
          'headline': grid.get('headline', 'rougeLsum')}


def floor_rows(setting: list[dict[str, Any]], metrics: Sequence[tuple[str, str, str]]) -> list[str]:
  """Table rows of the constant-answer floors ('"the"', the majority class) under the methods' columns that
  have one (ROUGE-LSum multi-ref and accuracy), averaged over the setting's partitions; none for cells
  that predate the floors."""
  out = []
  for answer, label in (('the', 'floor: always "the"'), ('majority', 'floor: always its majority class')):
    seeds: set[int] = set()   # partitions with a floor
    cols = []
    for field, _, _ in metrics:
      side, _, score = field.partition('_')
      key = f'floor_{side}_{answer}_{score}'
      vals = {int(r['partition_seed']): float(r[key]) for r in setting if r.get(key, '') != ''}
      seeds.update(vals)
      cols.append(f'{np.mean(list(vals.values())):.3f}' if vals else '')
    if seeds:
      out.append(f'| {label} | | {len(seeds)} | ' + ' | '.join(cols) + ' |')
  return out


def ceiling_rows(headroom: dict[str, Any] | None, rate: float, clients: int,
                 metrics: Sequence[tuple[str, str, str]]) -> list[str]:
  """Table rows of the linear-probe ceilings (studies/compare/headroom.py, WORKDIR/headroom.json) under the
  accuracy columns: probes on a node's own labels and on every node's labels, averaged over partitions."""
  setting = ((headroom or {}).get('settings') or {}).get(setting_key(rate, clients))
  if not setting:
    return []
  s = setting['summary']
  out = []
  for what, label in (('own', 'ceiling: linear probe, own labels'),
                      ('pooled', "ceiling: linear probe, every node's labels")):
    cols = [format(s[f.replace('accuracy', what)], '.3f') if f in ('client_accuracy', 'server_accuracy') else ''
            for f, _, _ in metrics]
    out.append(f"| {label} | | {s['partitions']} | " + ' | '.join(cols) + ' |')
  return out


def by_modality_rows(setting: list[dict[str, Any]], differences: Sequence[tuple[str, str]], client: str,
                     per_client: str) -> list[str]:
  """Exploratory table: each client-side difference over the clients of each modality set (clustered on
  the partition seed like the rest); none where the runs hold one modality set only or predate the field."""
  sets = sorted({m for r in setting for m in json.loads(r.get('client_modalities') or '{}').values()})
  if len(sets) < 2 or not differences:
    return []
  out = ['', f'By client modality set (exploratory, no correction): the client-side differences over the clients '
         f'that hold each set ({client}).', '', '| difference | ' + ' | '.join(sets) + ' |',
         '|---|' + '---|' * len(sets)]
  for m, b in differences:
    cells_ = [paired_difference(setting, m, b, client, per_client, modalities=mods) for mods in sets]
    out.append(f'| {m} - {b} | ' + ' | '.join('—' if d is None else _fmt_ci(d, signed=True) for d in cells_) + ' |')
  return out


def telemetry_section(results: list[dict[str, Any]]) -> list[str]:
  """Per method, each mechanism's mean per round and the share of rounds it fired, averaged over runs;
  a mechanism a method has that never fired is flagged."""
  per: dict[str, dict[str, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
  for r in results:
    for k, v in json.loads(r.get('telemetry') or '{}').items():
      per[r['method']][k].append(v)
  if not per:
    return []
  out = ['## Mechanisms (telemetry)', '', 'Per training round, averaged over rounds and runs: the mean value and '
         'the share of rounds in which it was above 0. **never fired**: the method has the mechanism and it did '
         'nothing in any round of any run.', '', '| method | telemetry | mean per round | rounds fired |',
         '|---|---|---|---|']
  for method in sorted(per):
    for k in sorted(per[method]):
      vals = per[method][k]
      mean, fired = np.mean([v['mean'] for v in vals]), np.mean([v['fired'] for v in vals])
      note = ' **never fired**' if fired == 0 and not k.endswith('_weight') else ''
      out.append(f'| {method} | {k} | {mean:.3f} | {fired:.0%}{note} |')
  return out + ['']


def headroom_section(headroom: dict[str, Any]) -> list[str]:
  """The headroom check in words: probe gaps per setting and the LM check."""
  out = ['## Headroom check (before the grid)', '',
         'Linear probes on simple sensor features (studies/compare/headroom.py), scored on the windows the '
         'evaluation scores: trained on a node\'s own labelled windows, and on every node\'s labelled windows '
         'seen through its modalities. The gap is what the others\' labels could give.', '',
         '| setting | partitions | client own | client pooled | client gap | server own | server pooled | server gap |',
         '|---|---|---|---|---|---|---|---|']
  for key, v in (headroom.get('settings') or {}).items():
    s = v['summary']
    out.append(f"| {key} | {s['partitions']} | {s['client_own']:.3f} | {s['client_pooled']:.3f} | "
               f"{s['client_gap']:+.3f} | {s['server_own']:.3f} | {s['server_pooled']:.3f} | {s['server_gap']:+.3f} |")
  lm = headroom.get('lm_check')
  if lm:
    out += ['', f"LM check: a local run with every label ({lm['run']}) writes a class sentence word for word in "
            f"{lm['client_sentence']:.1%} of its clients' answers at round {lm['round']} (needed: "
            f"{lm['minimum']:.0%}); client accuracy {lm['client_accuracy']:.3f}."]
  return out + ['']


def seed_spread(results: list[dict[str, Any]], method: str, field: str) -> float | None:
  """The mean, over partitions with two or more training seeds, of the range of the method's `field` across
  its training seeds: how far a cell moves when only its training seed changes (None: no such partition)."""
  ranges = [max(v) - min(v) for v in by_partition(results, method, field).values() if len(v) > 1]
  return float(np.mean(ranges)) if ranges else None


def repro_section(repro: list[dict[str, Any]], results: Sequence[dict[str, Any]] = ()) -> list[str]:
  """results.md's reproduction check: each rerun cell against the grid's (records of `reproduce`; records
  written before the largest-difference column hold the client ROUGE-LSum only), with the method's
  training-seed spread (`seed_spread`) beside the differences."""
  out = ['## Reproduction check', '',
         'Finished cells rerun from scratch. A cell is reproduced by rerunning it as it ran: a cell from a program '
         'of runs by rerunning that program (repro_program/), a single run as a single run (repro/). A cell from '
         'a program is also rerun alone; the program rounds some sums differently, so that rerun shows how '
         'far float rounding alone moves it. Largest difference: over every number of every row of metrics.jsonl; '
         'drift: the first round where some value differs by more than 0.1%. Seed spread: the mean, over '
         "partitions, of the method's range across its training seeds (clients / server), the size of change a "
         'perturbation can reach once the runs have drifted apart.', '',
         '| cell | rerun | metrics.jsonl identical | largest difference (where) | drift from round | '
         'client: grid / rerun | server: grid / rerun | seed spread |', '|---|---|---|---|---|---|---|---|']
  results, fields = list(results), {m: f for f, m, _ in METRICS}   # metrics.jsonl key -> results.csv field
  for r in repro:
    if 'client_original' not in r:   # the older record
      r = {**r, 'client_metric': 'client/rougeLsum_mean', 'client_original': r['client_rougeLsum_original'],
           'client_rerun': r['client_rougeLsum_rerun']}
    worst = f"{r['worst_abs_diff']:.2g} ({r['worst_at']})" if 'worst_abs_diff' in r else '—'
    server = (f"{r['server_metric']} {r['server_original']:.4f} / {r['server_rerun']:.4f}"
              if 'server_original' in r else '—')
    identical = str(r['identical'])
    if 'program_identical' in r:
      identical += f" ({r['program_identical']} of {r['rerun'].split()[-1]} runs of the program)"
    drift = r.get('drift_from_round', '—')
    method = next((x['method'] for x in results if r['cell'].startswith(x['cell'])), r['cell'].split('__')[0])
    spreads = [seed_spread(results, method, fields.get(r.get(k), '')) for k in ('client_metric', 'server_metric')]
    spread = ' / '.join('—' if x is None else f'{x:.4f}' for x in spreads)
    out.append(f"| {r['cell']} | {r.get('rerun', 'single run')} | {identical} | {worst} | "
               f"{'never' if drift is None else drift} | {r['client_metric']} {r['client_original']:.4f} / "
               f"{r['client_rerun']:.4f} | {server} | {spread} |")
  return out + ['']


def markdown_report(results: list[dict[str, Any]], repro: list[dict[str, Any]] | None = None,
                    contrasts: Sequence[tuple[str, str]] = CONTRASTS, reference: str = REFERENCE,
                    headroom: dict[str, Any] | None = None, design: str = '', headline: str = 'rougeLsum') -> str:
  """Per setting: means with 95% intervals clustered on the partition seed, the floors and probe ceilings;
  the pre-registered contrasts with Holm-adjusted p-values; other methods against the reference baseline
  fixed in the config, and the ablations against the full method (exploratory: not corrected); the
  headroom check (`headroom`, a headroom.json) and the reproduction check."""
  metrics = _present(results)
  out = ['# Results', '',
         'Each run is scored by the mean of its last evaluations. Intervals are 95% Student-t intervals over '
         'partition seeds (the randomised unit: a partition\'s training seeds are averaged first); client '
         'differences are paired per client on the same run. The contrasts and the reference baseline were '
         'fixed in the config before the grid ran (grid.contrasts, grid.reference).', '']
  groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
  for r in results:
    groups[(float(r['missing_rate']), int(r['num_clients']))][r['method']].append(r)
  for (rate, clients), by_method in sorted(groups.items()):
    setting = [r for rs in by_method.values() for r in rs]
    title = f'design {design} (explicit modality sets)' if design else f'missing rate {rate:g}'
    out += [f'## {title}, {clients} clients', '',
            '| method | runs | partitions | ' + ' | '.join(h for _, _, h in metrics) + ' |',
            '|---|---|---|' + '---|' * len(metrics)]
    for m, rs in by_method.items():
      cols = [_fmt_ci(stats.clustered_t(by_partition(rs, m, f))) if by_partition(rs, m, f) else '—'
              for f, _, _ in metrics]
      out.append(f'| {m} | {len(rs)} | {len({int(r["partition_seed"]) for r in rs})} | ' + ' | '.join(cols) + ' |')
    out += floor_rows(setting, metrics)
    out += ceiling_rows(headroom, rate, clients, metrics)
    family = [(a, b) for a, b in contrasts if a in by_method and b in by_method]
    if family:
      what = 'accuracy' if headline == 'accuracy' else 'ROUGE-LSum'
      out += ['', f'Pre-registered contrasts (headline {what}, grid.headline); **bold** where the Holm-adjusted '
              'p < 0.05.', '', '| contrast | side | Δ [95% CI] | partitions | p | p (Holm) |',
              '|---|---|---|---|---|---|']
      for r in contrast_rows(setting, family, headline=headline):
        txt = _fmt_ci(r, signed=True)
        txt = f'**{txt}**' if r['p_holm'] < 0.05 else txt
        out.append(f"| {r['contrast']} | {r['side']} | {txt} | {r['clusters']} | {_fmt_p(r['p'])} | "
                   f"{_fmt_p(r['p_holm'])} |")
    client, per_client, server = _headline_fields(metrics, headline)
    explore = [(m, reference) for m in by_method if m != reference and reference in by_method
               and not m.startswith('ml_ecs')]
    explore += [(m, 'ml_ecs') for m in by_method if m.startswith('ml_ecs_no_') and 'ml_ecs' in by_method]
    if explore:
      out += ['', f'Exploratory (no correction): baselines against the reference **{reference}**, ablations against '
              'the full method.', '', '| difference | client Δ [95% CI] | server Δ [95% CI] |', '|---|---|---|']
      for m, b in explore:
        cells_ = [paired_difference(setting, m, b, client, per_client), paired_difference(setting, m, b, server)]
        out.append(f'| {m} - {b} | ' + ' | '.join('—' if d is None else _fmt_ci(d, signed=True) for d in cells_)
                   + ' |')
    out += by_modality_rows(setting, family + explore, client, per_client)
    out.append('')
  out += telemetry_section(results)
  if headroom:
    out += headroom_section(headroom)
  if repro:
    out += repro_section(repro, results)
  return '\n'.join(out)
