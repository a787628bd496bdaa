"""benchmarks/device_check.sh runs end to end in its CPU-sized mode, so the accelerator script cannot rot."""
import json
import os
import subprocess
import sys

from configs import tiny
from ml_ecs.run import sizing
from tests.paths import ROOT, cached_env


def test_device_check_small_mode(tmp_path):
  env = cached_env(OUT=str(tmp_path), PYTHON=sys.executable, DEVICE_CHECK_WHEELS='0')
  proc = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'device_check.sh'), 'small'], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  files = set(os.listdir(tmp_path))
  assert {'env.json', 'cohort.json', 'fedavg_ours.json', 'pfl_torch.json', 'pair.json', 'summary.md'} <= files
  assert len(files) <= 8
  rows = json.load(open(tmp_path / 'cohort.json'))
  assert {r['variant'] for r in rows if 'client_steps_per_s' in r} == {'ours@1', 'drjax@1'}
  ours = json.load(open(tmp_path / 'fedavg_ours.json'))
  assert ours['rounds'] == 2 and ours['s_per_round'] > 0
  summary = (tmp_path / 'summary.md').read_text()
  assert '| small | 4 | ours@1 |' in summary and 'pfl-research CIFAR-10' in summary
  assert '# device check' in proc.stdout
  # The realistic-pair part (configs/tiny.py here), frozen weights in bfloat16: half of float32's bytes.
  (row,) = json.load(open(tmp_path / 'pair.json'))
  assert row['frozen_dtype'] == 'bfloat16' and len(row['round_s']) == 1 and row['comm_ratio'] > 0, row
  frozen = lambda s: (s['edge_cohorts'][0]['params']['frozen']['bytes'], s['server']['frozen']['bytes'])
  cfg = tiny.get_config()
  f32 = frozen(sizing.size_config(cfg))
  for name in ('edge_model', 'server_model'):
    cfg[name].backbone.frozen_dtype = 'bfloat16'
  assert (row['edge_frozen_bytes'], row['server_frozen_bytes']) == frozen(sizing.size_config(cfg)) == (
      f32[0] // 2, f32[1] // 2), (row, f32)
  assert '| bfloat16 |' in summary
