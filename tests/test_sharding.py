"""The client axis sharded over 4 forced CPU devices gives the metrics of one device."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.rows import assert_rows_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r'''
import json, sys
import jax
from configs import tiny
from ml_ecs.core import federation
from ml_ecs.run.compilation_cache import enable_compilation_cache
enable_compilation_cache(sys.argv[3])
cfg = tiny.get_config()
cfg.train.client_fraction = float(sys.argv[4])
setup, state = federation.init(cfg, workdir=sys.argv[2], log=lambda s: None)
rows = []
for _ in range(2):
  state, m = federation.run_round(setup, state)
  rows.append(m)
rows.append(federation.evaluate(setup, state))
leaf = jax.tree.leaves(state.cohorts[0].trainables)[0]
frozen = jax.tree.leaves(setup.edge_frozen)[0]
print('RESULT ' + json.dumps({
    'devices': jax.device_count(), 'rows': rows,
    'stacked': [len(c.client_ids) for c in setup.cohorts], 'real': [c.num_real for c in setup.cohorts],
    'client_spec': str(leaf.sharding.spec), 'frozen_replicated': frozen.sharding.is_fully_replicated,
    'global_shared': [float(abs(x).sum()) for x in jax.tree.leaves(state.global_shared)]}, default=float))
'''


def _run(devices, workdir, cache, fraction):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu')
  res = subprocess.run([sys.executable, '-c', PROBE, '', str(workdir), str(cache), str(fraction)],
                       capture_output=True, text=True, env=env, timeout=900)
  assert res.returncode == 0, res.stderr[-4000:]
  line = [l for l in res.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


@pytest.mark.slow
@pytest.mark.parametrize('fraction', [1.0, 0.5])
def test_four_devices_match_one(tmp_path, fraction):
  cache = os.path.join(ROOT, '.pytest_cache', 'jax_cache')
  one = _run(1, tmp_path, cache, fraction)
  four = _run(4, tmp_path, cache, fraction)
  assert one['devices'] == 1 and four['devices'] == 4
  assert four['real'] == one['real'] and all(s % 4 == 0 for s in four['stacked'])
  assert four['stacked'] != four['real']            # padding clients exist ...
  assert "'clients'" in four['client_spec'] and four['frozen_replicated']
  np.testing.assert_allclose(four['global_shared'], one['global_shared'], rtol=1e-4)
  assert_rows_close(one['rows'], four['rows'])      # ... and never reach the metrics
