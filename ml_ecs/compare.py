"""A resumable grid of runs (method x missing rate x clients x seed) and its reports.

A cell's directory is named by its settings and a hash of its resolved config, so a
changed setting never reuses a stale result; a cell interrupted mid-run resumes from its
own checkpoint (ml_ecs.trainer), and a finished cell (summary.json) is not rerun.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
from collections import defaultdict
from typing import Any, Callable

import ml_collections
import numpy as np

from ml_ecs import metrics_io, report
from ml_ecs.strategies import apply_strategy

CSV_FIELDS = ('method', 'missing_rate', 'num_clients', 'seed', 'cell', 'client_rougeLsum', 'server_rougeLsum',
              'client_accuracy', 'server_accuracy', 'comm_ratio', 'client_rougeLsum_by_client', 'rounds', 'wall_s')
# Columns of the markdown table: (csv field, header, higher is better).
TABLE_COLUMNS = (('client_rougeLsum', 'client ROUGE-LSum', True), ('server_rougeLsum', 'server ROUGE-LSum', True),
                 ('client_accuracy', 'client acc', True), ('server_accuracy', 'server acc', True),
                 ('comm_ratio', 'comm ratio / round', False))


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


def cells(grid: ml_collections.ConfigDict) -> list[tuple[str, float, int, int]]:
  """Every (method, missing rate, clients, seed) of the grid."""
  return list(itertools.product(_values('methods', grid.methods, str), _values('missing_rates', grid.missing_rates, float),
                                _values('num_clients', grid.num_clients, int), _values('seeds', grid.seeds, int)))


def cell_name(method: str, rate: float, clients: int, seed: int) -> str:
  return f'{method}__mr{rate:g}__c{clients}__s{seed}'


def cell_dir(workdir: str, method: str, rate: float, clients: int, seed: int,
             cfg: ml_collections.ConfigDict) -> str:
  """The cell's run directory: settings plus a hash of the resolved config."""
  digest = hashlib.sha1(cfg.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:8]
  return os.path.join(workdir, 'cells', f'{cell_name(method, rate, clients, seed)}__{digest}')


def cell_config(base: ml_collections.ConfigDict, method: str, rate: float, clients: int, seed: int):
  cfg = apply_strategy(base, method)
  del cfg['grid']
  cfg.data.modality_missing_rate = rate
  cfg.data.num_clients = clients
  cfg.data.num_device_types = min(cfg.data.num_device_types, clients)
  cfg.seed = seed
  cfg.data.seed = seed
  return cfg


def cell_row(method, rate, clients, seed, cell: str, rows: list[dict], timings: list[dict]) -> dict[str, Any]:
  """The results row of a finished cell (`cell`: its directory name under cells/)."""
  last = [r for r in rows if 'client/rougeLsum_mean' in r][-1]
  return {'method': method, 'missing_rate': rate, 'num_clients': clients, 'seed': seed, 'cell': cell,
          'client_rougeLsum': last['client/rougeLsum_mean'], 'server_rougeLsum': last['server/rougeLsum'],
          'client_accuracy': last['client/accuracy_mean'], 'server_accuracy': last['server/accuracy'],
          'comm_ratio': max((r.get('comm/ratio', 0.0) for r in rows), default=0.0),
          'client_rougeLsum_by_client': json.dumps(last['client/rougeLsum'], sort_keys=True),
          'rounds': last['round'], 'wall_s': max((t.get('time/elapsed_s', 0.0) for t in timings), default=float('nan'))}


def run_grid(base: ml_collections.ConfigDict, workdir: str, train_fn: Callable, log: Callable[[str], None] = print,
             progress: bool = False) -> list[dict[str, Any]]:
  """Runs (or resumes) every cell not yet finished, writing the reports after each.

  `train_fn(cfg, cell_dir, cache_dir)` runs one cell and returns whether it finished (False:
  interrupted, e.g. by SIGTERM; the grid then stops, to resume on the next call).
  `progress`: a bar over the cells with an ETA from the cells run so far.
  """
  from tqdm import tqdm
  cache = os.path.join(workdir, 'cache')
  results = []
  todo = cells(base.grid)
  bar = tqdm(total=len(todo), desc='grid', unit='cell', disable=not progress, dynamic_ncols=True)
  try:
    for i, (method, rate, clients, seed) in enumerate(todo):
      cfg = cell_config(base, method, rate, clients, seed)
      cdir = cell_dir(workdir, method, rate, clients, seed, cfg)
      name = os.path.basename(cdir)
      if os.path.exists(os.path.join(cdir, 'summary.json')):
        log(f'[{i + 1}/{len(todo)}] {name}: done, skipped')
        bar.total -= 1          # finished earlier: not part of this call's ETA
        bar.refresh()
      else:
        log(f'[{i + 1}/{len(todo)}] {name}: running')
        if not train_fn(cfg, cdir, cache):
          log(f'grid stopped in {name}; rerun the same command to resume')
          return results
        bar.update(1)
      timing_path = os.path.join(cdir, 'timing.jsonl')
      results.append(cell_row(method, rate, clients, seed, name, metrics_io.read_jsonl(os.path.join(cdir, 'metrics.jsonl')),
                              metrics_io.read_jsonl(timing_path) if os.path.exists(timing_path) else []))
      write_reports(results, workdir)
  finally:
    bar.close()
  return results


def write_reports(results: list[dict[str, Any]], workdir: str) -> None:
  """results.csv, results.md and the two plots (atomically replaced)."""
  tmp = os.path.join(workdir, 'results.csv.tmp')
  with open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    w.writeheader()
    w.writerows(results)
  os.replace(tmp, os.path.join(workdir, 'results.csv'))
  md = markdown_table(results)
  tmp = os.path.join(workdir, 'results.md.tmp')
  with open(tmp, 'w') as f:
    f.write(md)
  os.replace(tmp, os.path.join(workdir, 'results.md'))
  report.report_grid(workdir, out_dir=workdir)


def _mean_std(vals: list[float]) -> tuple[float, float]:
  a = np.asarray(vals, float)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def markdown_table(results: list[dict[str, Any]]) -> str:
  """One table per (missing rate, clients) setting: mean +- std over seeds, best per column in bold."""
  groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
  for r in results:
    groups[(r['missing_rate'], r['num_clients'])][r['method']].append(r)
  out = ['# Results', '', 'Final-round values, mean ± std over seeds (n = number of seeds); best mean per column in **bold**.', '']
  out += pivot_table(results)
  for (rate, clients), by_method in sorted(groups.items()):
    out += [f'## missing rate {rate:g}, {clients} clients', '',
            '| method | n | ' + ' | '.join(h for _, h, _ in TABLE_COLUMNS) + ' |',
            '|---|---|' + '---|' * len(TABLE_COLUMNS)]
    stats = {m: {c: _mean_std([r[c] for r in rs]) for c, _, _ in TABLE_COLUMNS} for m, rs in by_method.items()}
    best = {}
    for c, _, higher in TABLE_COLUMNS:
      means = [s[c][0] for s in stats.values()]
      best[c] = max(means) if higher else min(means)
    for m, rs in by_method.items():
      cols = []
      for c, _, _ in TABLE_COLUMNS:
        mean, std = stats[m][c]
        fmt = f'{mean:.4f} ± {std:.4f}' if c != 'comm_ratio' else f'{mean:.3%}'
        cols.append(f'**{fmt}**' if math.isclose(mean, best[c], rel_tol=1e-9, abs_tol=1e-12) else fmt)
      out.append(f'| {m} | {len(rs)} | ' + ' | '.join(cols) + ' |')
    out.append('')
  return '\n'.join(out)


def pivot_table(results: list[dict[str, Any]]) -> list[str]:
  """Markdown lines: per clients count, methods x missing rate of client and server ROUGE-LSum."""
  methods = list(dict.fromkeys(r['method'] for r in results))
  rates = sorted({r['missing_rate'] for r in results})
  out = []
  for clients in sorted({r['num_clients'] for r in results}):
    cell = {}
    for m in methods:
      for rate in rates:
        rs = [r for r in results if (r['method'], r['missing_rate'], r['num_clients']) == (m, rate, clients)]
        for key in ('client_rougeLsum', 'server_rougeLsum'):
          cell[m, rate, key] = _mean_std([r[key] for r in rs]) if rs else None
    header = [f'client @{r:g}' for r in rates] + [f'server @{r:g}' for r in rates]
    out += [f'## ROUGE-LSum by missing rate, {clients} clients', '', '| method | ' + ' | '.join(header) + ' |',
            '|---|' + '---|' * len(header)]
    best = {(rate, key): max((cell[m, rate, key][0] for m in methods if cell[m, rate, key]), default=None)
            for rate in rates for key in ('client_rougeLsum', 'server_rougeLsum')}
    for m in methods:
      cols = []
      for key in ('client_rougeLsum', 'server_rougeLsum'):
        for rate in rates:
          if cell[m, rate, key] is None:
            cols.append('—')
            continue
          mean, std = cell[m, rate, key]
          txt = f'{mean:.3f} ± {std:.3f}'
          cols.append(f'**{txt}**' if math.isclose(mean, best[rate, key], rel_tol=1e-9) else txt)
      out.append(f'| {m} | ' + ' | '.join(cols) + ' |')
    out.append('')
  return out
