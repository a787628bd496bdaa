"""End to end: rounds of a tiny federation, aggregation semantics, checkpoints, the main command."""
import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ml_ecs import aggregation
from ml_ecs.checkpoint import Checkpointer
from ml_ecs.federation import Federation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_KEYS = ('round', 'server/rougeLsum', 'client/rougeLsum_mean', 'client/rougeLsum', 'comm/bytes_up',
               'comm/bytes_down', 'comm/ratio', 'client/private_lm', 'client/private_ccl', 'client/public_align',
               'server/lm', 'time/round_s')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('fed'))


@pytest.fixture(scope='module')
def fed(tiny_config, workdir, dataset):
  return Federation(tiny_config, workdir=workdir, dataset=dataset, log=lambda s: None)


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def test_two_rounds_aggregate_shared_and_keep_private(fed):
  init = [_np(c.trainables) for c in fed.cohorts]
  metrics = fed.run_round()
  for k in ('client/private_lm', 'client/private_ccl', 'client/public_align', 'server/lm', 'server/align'):
    assert np.isfinite(metrics[k]), k
  assert metrics['mma/excluded'] == 0 and metrics['comm/ratio'] > 0
  # The new global shared LoRA is the MMA mean of the clients' locally trained shared LoRA.
  w = np.concatenate([fed.weights[c.client_ids] for c in fed.cohorts])
  pres = np.concatenate([np.tile([[m in c.data.modalities for m in fed.modalities]], (len(c.client_ids), 1))
                         for c in fed.cohorts]).astype(np.float32)
  stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *[_np(c.trainables['shared']) for c in fed.cohorts])

  def expected(x, m):
    wl = w * pres[:, m] if m >= 0 else w
    return np.tensordot(wl, x, 1) / wl.sum()

  ref = jax.tree.map(expected, stacked, fed.leaf_mod)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), _np(fed.global_shared), ref)
  # Local training changed every part on every client; the first cohort's two clients stay distinct.
  for c, before in zip(fed.cohorts, init):
    for part in ('shared', 'private', 'encoders', 'connector'):
      diff = jax.tree.map(lambda a, b: np.abs(a - b).reshape(a.shape[0], -1).max(1), _np(c.trainables[part]), before[part])
      assert (np.max(np.stack(jax.tree.leaves(diff)), axis=0) > 0).all(), part
  two = fed.cohorts[0]
  assert len(two.client_ids) == 2
  for part in ('private', 'encoders'):
    leaves = jax.tree.leaves(_np(two.trainables[part]))
    assert any(not np.allclose(x[0], x[1]) for x in leaves), part
  metrics2 = fed.run_round()
  assert metrics2['round'] == 2
  ev = fed.evaluate()
  assert set(ev['client/rougeLsum']) == {str(c.client_id) for c in fed.partition.clients}
  assert 0.0 <= ev['server/rougeLsum'] <= 1.0 and 0.0 <= ev['client/accuracy_mean'] <= 1.0


def test_broadcast_replaces_shared_and_keeps_private(tiny_config, workdir, dataset):
  cfg = copy.deepcopy(tiny_config)
  cfg.train.update(dict(public_steps=0, private_steps=0, server_steps=1))
  f = Federation(cfg, workdir=workdir, dataset=dataset, log=lambda s: None)
  key = jax.random.key(5)
  for c in f.cohorts:   # make every client's parts distinct and nonzero
    for part in ('shared', 'private'):
      c.trainables[part] = jax.tree.map(lambda x: x + jax.random.normal(key, x.shape), c.trainables[part])
  g = jax.tree.map(lambda x: x + 1.0, f.global_shared)
  f.global_shared = g
  before = [_np(c.trainables) for c in f.cohorts]
  f.run_round()
  for c, b in zip(f.cohorts, before):
    jax.tree.map(lambda x, gg: np.testing.assert_array_equal(x, np.broadcast_to(gg, x.shape)),
                 _np(c.trainables['shared']), _np(g))
    for part in ('private', 'encoders', 'connector'):
      jax.tree.map(np.testing.assert_array_equal, _np(c.trainables[part]), b[part])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), _np(f.global_shared), _np(g))


def test_checkpoint_roundtrip(fed, tmp_path):
  ckpt = Checkpointer(str(tmp_path / 'ckpt'))
  state = fed.state()
  ckpt.save(3, state)
  restored = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
  jax.tree.map(np.testing.assert_array_equal, _np(restored), _np(state))
  assert ckpt.latest_step() == 3
  ckpt.close()


def test_bad_method_config_is_a_clear_error(tiny_config, dataset):
  cfg = copy.deepcopy(tiny_config)
  cfg.method.mma_weights = 'median'
  with pytest.raises(ValueError, match='method.mma_weights'):
    Federation(cfg, dataset=dataset)


@pytest.mark.slow
def test_main_command_writes_results(tmp_path):
  out = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(ROOT, 'launch', 'train.py'), '--config=' + os.path.join(ROOT, 'configs', 'tiny.py'),
         f'--workdir={out}', '--config.train.rounds=2', '--noprogress']
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [json.loads(l) for l in open(out / 'metrics.jsonl')]
  assert [r['round'] for r in rows] == [0, 1, 2]
  for key in METRIC_KEYS:
    assert key in rows[-1], key
  summary = json.load(open(out / 'summary.json'))
  assert summary['server/rougeLsum']['final_round'] == 2
  assert json.load(open(out / 'config.json'))['train']['rounds'] == 2
  assert os.path.isdir(out / 'checkpoints' / '2')
  assert 'round   2' in res.stdout + res.stderr


@pytest.mark.slow
def test_chunked_cohort_equals_plain_vmap(tiny_config, workdir, dataset):
  out = []
  for chunk in (0, 1):
    cfg = copy.deepcopy(tiny_config)
    cfg.train.client_chunk = chunk
    f = Federation(cfg, workdir=workdir, dataset=dataset, log=lambda s: None)
    m = f.run_round()
    out.append((m, _np(f.global_shared), _np(f.cohorts[0].trainables['private'])))
  (m0, g0, p0), (m1, g1, p1) = out
  np.testing.assert_allclose(m1['client/private_lm'], m0['client/private_lm'], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p1, p0)
