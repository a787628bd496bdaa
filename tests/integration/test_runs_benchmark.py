"""The run-axis benchmarks end to end on a tiny grid, so none can rot: benchmarks/runs_program.py measures a program
of 2 runs and 2 runs one by one, benchmarks/protocol_cost.py costs a protocol from it, and
benchmarks/round_parts.py times and profiles a program's rounds."""
import json
import os
import subprocess
import sys

import pytest

from tests.paths import ROOT, cached_env

pytestmark = pytest.mark.slow

TINY_GRID = '''
from configs import tiny


def get_config():
  c = tiny.get_config()
  c.grid = dict(methods=('ml_ecs',), missing_rates=(0.3,), num_clients=(3,), partition_seeds=(0, 1),
                train_seeds=(0, 1), modality_seed=0, last_k=1, tuned='', reproduce=1, runs_per_program=2)
  return c
'''


def test_runs_benchmark_and_protocol_projection(tmp_path):
  config = tmp_path / 'tiny_grid.py'
  config.write_text(TINY_GRID)
  out = tmp_path / 'measured'
  env = cached_env(PYTHONPATH=ROOT)
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                     timeout=900)
  proc = run('benchmarks/runs_program.py', f'--config={config}', '--runs=2', '--separate=2', '--rounds=2',
             f'--out={out}')
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  report = json.load(open(out / 'runs_program.json'))
  assert report['complete'] and list(report['programs']) == ['2']
  assert len(report['separate']['per_run_s']) == 2 and [r['runs'] for r in report['rows']] == [2]
  proc = run('benchmarks/protocol_cost.py', f'--measured={out / "runs_program.json"}', f'--config={config}',
             f'--out={tmp_path / "projected"}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  (q,) = json.load(open(tmp_path / 'projected' / 'protocol_cost.json'))['protocols']
  # 4 cells as 2 programs of 2; the reproduction check reruns one cell's program and the cell alone
  assert [(r['stage'], r['runs'], r['program_sizes']) for r in q['stages']] == [('grid', 4, [2, 2]),
                                                                                ('reproduce', 1, [2])]
  assert q['differs_from_measured'] == [] and q['total']['programs_median_s'] > 0
  assert '| **total** | 5 |' in (tmp_path / 'projected' / 'protocol_cost.md').read_text()


def test_round_parts_times_a_programs_rounds_part_by_part(tmp_path):
  """benchmarks/round_parts.py on the tiny grid: one JSON line per round with its parts, the later rounds'
  medians, and with --profile each round program's flops and costliest operators."""
  config = tmp_path / 'tiny_grid.py'
  config.write_text(TINY_GRID)
  proc = subprocess.run([sys.executable, 'benchmarks/round_parts.py', f'--config={config}', '--runs=2', '--rounds=2',
                         '--profile=2', f'--cache={tmp_path / "cache"}'], cwd=ROOT, env=cached_env(PYTHONPATH=ROOT),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{')]
  head, rounds = lines[0], [x for x in lines if 'round' in x]
  assert head['runs'] == 2 and head['run_batch'] == 1   # one run at a time: the CPU's default
  assert [r['round'] for r in rounds] == [1, 2]
  for r in rounds:
    assert r['time/round_s'] >= r['time/cohorts_s'] > 0 and r['time/server_s'] > 0
  medians = next(x for x in lines if 'later_rounds_median' in x)
  assert medians['per_run_round_s'] == pytest.approx(rounds[1]['time/round_s'] / 2, rel=1e-3)
  profiled = {x['program'] for x in lines if 'gflop' in x}
  assert 'server stage' in profiled and any(p.startswith('cohort ') for p in profiled)
  assert all(x['gflop'] > 0 for x in lines if 'gflop' in x)
  assert 'operators of server stage' in proc.stdout
