"""benchmarks/runs_program.py and benchmarks/protocol_cost.py end to end on a tiny grid, so neither can rot: the
benchmark measures a program of 2 runs and 2 runs one by one, and the projection costs a protocol from it."""
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
