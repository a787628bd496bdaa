"""benchmarks/device_check.sh runs end to end in its CPU-sized mode, so the accelerator script cannot rot."""
import json
import os
import subprocess
import sys
from tests.paths import ROOT



def test_device_check_small_mode(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, DEVICE_CHECK_WHEELS='0', JAX_PLATFORMS='cpu')
  proc = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'device_check.sh'), 'small'], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  files = set(os.listdir(tmp_path))
  assert {'env.json', 'cohort.json', 'fedavg_ours.json', 'pfl_torch.json', 'summary.md'} <= files
  assert len(files) <= 8
  rows = json.load(open(tmp_path / 'cohort.json'))
  assert {r['variant'] for r in rows if 'client_steps_per_s' in r} == {'ours@1', 'drjax@1'}
  ours = json.load(open(tmp_path / 'fedavg_ours.json'))
  assert ours['rounds'] == 2 and ours['s_per_round'] > 0
  summary = (tmp_path / 'summary.md').read_text()
  assert '| small | 4 | ours@1 |' in summary and 'pfl-research CIFAR-10' in summary
  assert '# device check' in proc.stdout
