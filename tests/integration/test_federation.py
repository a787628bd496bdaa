"""End to end: the main command on configs/tiny.py, and the chunked cohort against one vmap."""
import copy
import json
import os

import jax
import numpy as np
import pytest

from ml_ecs.core import federation

METRIC_KEYS = ('round', 'server/rougeLsum', 'client/rougeLsum_mean', 'client/rougeLsum', 'comm/bytes_up',
               'comm/bytes_down', 'comm/ratio', 'client/private_lm', 'client/private_ccl', 'client/public_se_ccl',
               'server/lm')


def _np(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.mark.slow
@pytest.mark.xdist_group('tiny_main_run')
def test_main_command_writes_results(tiny_main_run):
  out, returncode, stdout, stderr = tiny_main_run   # launch/train.py, configs/tiny.py, --config.train.rounds=2
  assert returncode == 0, stderr[-3000:]
  rows = [json.loads(l) for l in open(out / 'metrics.jsonl')]
  assert [r['round'] for r in rows] == [0, 1, 2]
  for key in METRIC_KEYS:
    assert key in rows[-1], key
  summary = json.load(open(out / 'summary.json'))
  assert summary['server/rougeLsum']['final_round'] == 2
  floors = summary['floors']   # constant answers ("the" names no class, so never scores)
  assert floors['floor/client/the_accuracy'] == floors['floor/server/the_accuracy'] == 0.0
  assert 0.0 < floors['floor/client/majority_accuracy'] < 1.0
  assert json.load(open(out / 'config.json'))['train']['rounds'] == 2
  assert os.path.isdir(out / 'checkpoints' / '2')
  assert 'round   2' in stdout + stderr


@pytest.mark.slow
def test_chunked_cohort_equals_plain_vmap(tiny_config, dataset, tmp_path):
  out = []
  for chunk in (0, 1):
    cfg = copy.deepcopy(tiny_config)
    cfg.train.client_chunk = chunk
    setup, state = federation.init(cfg, workdir=str(tmp_path), dataset=dataset, log=lambda s: None)
    state, m = federation.run_round(setup, state)
    out.append((m, _np(state.global_shared), _np(state.cohorts[0].trainables['private'])))
  (m0, g0, p0), (m1, g1, p1) = out
  np.testing.assert_allclose(m1['client/private_lm'], m0['client/private_lm'], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p1, p0)
