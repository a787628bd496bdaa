"""The client axis sharded over 4 forced CPU devices gives the metrics of one device."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.paths import JAX_CACHE, ROOT, xla_flags
from tests.rows import assert_rows_close

FRACTIONS = (1.0, 0.5)
# One process per device count runs configs/tiny.py at every client fraction (argv[4:]) in turn:
# 2 rounds and an evaluation each, one RESULT line each.
PROBE = r'''
import json, sys
import jax
from configs import tiny
from ml_ecs.core import federation
from ml_ecs.run.compilation_cache import enable_compilation_cache
enable_compilation_cache(sys.argv[3])
for fraction in sys.argv[4:]:
  cfg = tiny.get_config()
  cfg.train.client_fraction = float(fraction)
  setup, state = federation.init(cfg, workdir=sys.argv[2], log=lambda s: None)
  rows = []
  for _ in range(2):
    state, m = federation.run_round(setup, state)
    rows.append(m)
  rows.append(federation.evaluate(setup, state))
  leaf = jax.tree.leaves(state.cohorts[0].trainables)[0]
  frozen = jax.tree.leaves(setup.edge_frozen)[0]
  print('RESULT ' + json.dumps({
      'fraction': float(fraction), 'devices': jax.device_count(), 'rows': rows,
      'stacked': [len(c.client_ids) for c in setup.cohorts], 'real': [c.num_real for c in setup.cohorts],
      'client_spec': str(leaf.sharding.spec), 'frozen_replicated': frozen.sharding.is_fully_replicated,
      'global_shared': [float(abs(x).sum()) for x in jax.tree.leaves(state.global_shared)]}, default=float))
'''
# The runs are shared by the tests of this module, all on one xdist worker.
pytestmark = pytest.mark.xdist_group('sharding')


def _run(devices, workdir, cache, fractions) -> dict[float, dict]:
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS='cpu')
  res = subprocess.run([sys.executable, '-c', PROBE, '', str(workdir), str(cache), *map(str, fractions)],
                       capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-4000:]
  results = [json.loads(l[len('RESULT '):]) for l in res.stdout.splitlines() if l.startswith('RESULT ')]
  return {r['fraction']: r for r in results}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{device count: {client fraction: result}}: one device, then four (reusing its pretrained backbones)."""
  workdir = tmp_path_factory.mktemp('sharding')
  return {devices: _run(devices, workdir, JAX_CACHE, FRACTIONS) for devices in (1, 4)}


@pytest.mark.slow
@pytest.mark.parametrize('fraction', FRACTIONS)
def test_four_devices_match_one(runs, fraction):
  one, four = runs[1][fraction], runs[4][fraction]
  assert one['devices'] == 1 and four['devices'] == 4
  assert four['real'] == one['real'] and all(s % 4 == 0 for s in four['stacked'])
  assert four['stacked'] != four['real']            # padding clients exist ...
  assert "'clients'" in four['client_spec'] and four['frozen_replicated']
  np.testing.assert_allclose(four['global_shared'], one['global_shared'], rtol=1e-4)
  assert_rows_close(one['rows'], four['rows'])      # ... and never reach the metrics
