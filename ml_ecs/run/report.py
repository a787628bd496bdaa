"""The report of a workdir as PNG files: a run's four pictures, or a grid's comparison plots.

A run workdir holds metrics.jsonl (and, when the trainer writes it, clients.json); a grid
workdir holds results.csv and/or cells/*/ (each cell a run workdir). Works while the job is
still running: it draws whatever rows are there.
"""
from __future__ import annotations

import csv
import glob
import json
import os
from typing import Any

from ml_ecs.run import plots

REPORT_DIR = 'report'
RUN_PICTURES = ('curves', 'clients', 'communication', 'losses')


class NotAWorkdirError(ValueError):
  """The directory is neither a run workdir nor a grid workdir."""


def read_rows(path: str) -> list[dict[str, Any]]:
  """metrics.jsonl rows (null, a non-finite value on disk, as NaN); a torn last line (a writer caught
  mid-write) is skipped."""
  from ml_ecs.run.metrics_io import nan_for_null
  rows = []
  with open(path) as f:
    for line in f:
      if line.strip():
        try:
          rows.append(nan_for_null(json.loads(line)))
        except json.JSONDecodeError:
          continue
  return [r for r in rows if 'round' in r]


def load_run(workdir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
  """(metrics rows, clients.json list or None) of a run workdir."""
  rows = read_rows(os.path.join(workdir, 'metrics.jsonl'))
  clients_path = os.path.join(workdir, 'clients.json')
  clients = None
  if os.path.exists(clients_path):
    with open(clients_path) as f:
      clients = json.load(f)
  return rows, clients


def _cell_key(cfg: dict[str, Any]) -> dict[str, Any]:
  return {'method': cfg['method']['name'], 'missing_rate': float(cfg['data']['modality_missing_rate']),
          'num_clients': int(cfg['data']['num_clients']), 'seed': int(cfg.get('seed', 0))}


def load_grid(workdir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(results.csv rows of finished cells, cells with their metrics rows) of a grid workdir.

  A cell is identified by its own config.json (method.name, data.modality_missing_rate,
  data.num_clients, seed), not by its folder name.
  """
  results: list[dict[str, Any]] = []
  results_path = os.path.join(workdir, 'results.csv')
  if os.path.exists(results_path):
    with open(results_path, newline='') as f:
      results = list(csv.DictReader(f))
  cells = []
  for cdir in sorted(glob.glob(os.path.join(workdir, 'cells', '*'))):
    cfg_path, metrics_path = os.path.join(cdir, 'config.json'), os.path.join(cdir, 'metrics.jsonl')
    if not (os.path.exists(cfg_path) and os.path.exists(metrics_path)):
      continue
    with open(cfg_path) as f:
      cells.append({**_cell_key(json.load(f)), 'rows': read_rows(metrics_path)})
  return results, cells


def is_run(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, 'metrics.jsonl'))


def is_grid(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, 'results.csv')) or os.path.isdir(os.path.join(workdir, 'cells'))


def report_run(workdir: str, out_dir: str | None = None) -> list[str]:
  """curves.png, clients.png, communication.png, losses.png of a run; returns their paths."""
  rows, clients = load_run(workdir)
  if not rows:
    raise NotAWorkdirError(f'{workdir}: metrics.jsonl has no rows yet')
  out_dir = out_dir or os.path.join(workdir, REPORT_DIR)
  paths = [os.path.join(out_dir, f'{name}.png') for name in RUN_PICTURES]
  plots.plot_curves(rows, path=paths[0])
  plots.plot_clients(rows, clients, path=paths[1])
  plots.plot_communication(rows, path=paths[2])
  plots.plot_losses(rows, path=paths[3])
  return paths


def report_grid(workdir: str, out_dir: str | None = None) -> list[str]:
  """rouge_vs_round.png (from every cell's rows) and rouge_vs_missing_rate.png (finished cells)."""
  results, cells = load_grid(workdir)
  out_dir = out_dir or os.path.join(workdir, REPORT_DIR)
  paths = []
  if any(plots.series(c['rows'], 'client/rougeLsum_mean')[0] for c in cells):
    paths.append(os.path.join(out_dir, 'rouge_vs_round.png'))
    plots.plot_grid_rouge_vs_round(cells, path=paths[-1])
  if results:
    paths.append(os.path.join(out_dir, 'rouge_vs_missing_rate.png'))
    plots.plot_grid_rouge_vs_missing_rate(results, path=paths[-1])
  if not paths:
    raise NotAWorkdirError(f'{workdir}: a grid workdir with no evaluated cell yet '
                           '(no results.csv rows, no cells/*/metrics.jsonl with an evaluation)')
  return paths


def report(workdir: str, out_dir: str | None = None) -> list[str]:
  """The PNGs of `workdir` (a run or a grid), written under `out_dir` (default workdir/report/)."""
  if not os.path.isdir(workdir):
    raise NotAWorkdirError(f'{workdir}: no such directory')
  if is_run(workdir):
    return report_run(workdir, out_dir)
  if is_grid(workdir):
    return report_grid(workdir, out_dir)
  raise NotAWorkdirError(f'{workdir}: neither a run workdir (expected metrics.jsonl, written by '
                         'launch/train.py) nor a grid workdir (expected results.csv or cells/, written by '
                         'studies/compare/run.py)')
