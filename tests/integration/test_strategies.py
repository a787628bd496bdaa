"""Every baseline/ablation runs in the same loop, and each switch really removes its component."""
import copy
import json
import os

import jax
import numpy as np
import pytest

from studies.compare import grid as compare
from ml_ecs.core import federation
from ml_ecs.algorithms.registry import STRATEGIES, apply_strategy

_RUNS = {}
# The runs of the full method and its ablations are shared by their own tests and the ablation test:
# those tests go to one xdist worker (the other strategies' tests are free to run elsewhere).
ABLATION = pytest.mark.xdist_group('strategies_ablation')
ABLATED = ('ml_ecs', 'ml_ecs_no_amt', 'ml_ecs_no_ccl', 'ml_ecs_no_mma', 'ml_ecs_no_se_ccl')


def _one_cohort(cfg):
  cfg = copy.deepcopy(cfg)
  cfg.data.modality_sets = (('accel', 'depth', 'image'), ('accel', 'depth', 'image'), ('accel', 'depth', 'image'))
  return cfg


def _run(name, base, dataset, workdir, rounds=2):
  """((setup, final state), metrics of each round, trainables before) of strategy `name`, cached."""
  if name not in _RUNS:
    setup, state = federation.init(apply_strategy(_one_cohort(base), name), workdir=str(workdir), dataset=dataset,
                                   log=lambda s: None)
    before = jax.tree.map(np.asarray, state.cohorts[0].trainables)
    metrics = []
    for _ in range(rounds):
      state, m = federation.run_round(setup, state)
      metrics.append(m)
    _RUNS[name] = ((setup, state), metrics, before)
  return _RUNS[name]


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('strategies')


@pytest.mark.slow
@pytest.mark.parametrize('name', [pytest.param(n, marks=ABLATION) if n in ABLATED else n
                                  for n in sorted(STRATEGIES)])
def test_strategy_runs_two_rounds(name, tiny_config, dataset, cache_dir):
  (setup, state), metrics, _ = _run(name, tiny_config, dataset, cache_dir)
  assert [m['round'] for m in metrics] == [1, 2]
  assert np.isfinite(metrics[-1]['client/private_lm']) and np.isfinite(metrics[-1]['server/lm'])
  ev = federation.evaluate(setup, state)
  assert 0.0 <= ev['client/rougeLsum_mean'] <= 1.0
  if name == 'local':
    assert metrics[-1]['comm/bytes_up'] == 0 and 'mma/excluded' not in metrics[-1]
  else:
    assert metrics[-1]['comm/lora_bytes_up'] > 0


@pytest.mark.slow
@ABLATION
def test_ablation_switches_remove_their_component(tiny_config, dataset, cache_dir):
  full = _run('ml_ecs', tiny_config, dataset, cache_dir)[1][-1]
  assert {'client/private_ccl', 'client/public_se_ccl', 'server/se_ccl', 'server/ccl'} <= set(full)
  # without CCL: no CCL term anywhere.
  (setup, _), m, _ = _run('ml_ecs_no_ccl', tiny_config, dataset, cache_dir)
  assert 'client/private_ccl' not in m[-1] and 'server/ccl' not in m[-1] and setup.stages.private.lambda_ccl == 0
  assert 'client/public_se_ccl' in m[-1]
  # without SE-CCL: no alignment term, no representations sent.
  (setup, _), m, _ = _run('ml_ecs_no_se_ccl', tiny_config, dataset, cache_dir)
  assert 'client/public_se_ccl' not in m[-1] and 'server/se_ccl' not in m[-1]
  assert m[-1]['comm/reps_bytes_up'] == 0 and m[-1]['comm/lora_bytes_up'] > 0
  # without MMA: FedAvg sample weights, no modality masking.
  num_samples = lambda s: np.array([len(c.train_idx) for c in s.partition.clients])
  num_mods = lambda s: np.array([len(c.modalities) for c in s.partition.clients])
  (setup, _), _, _ = _run('ml_ecs_no_mma', tiny_config, dataset, cache_dir)
  np.testing.assert_array_equal(setup.weights, num_samples(setup))
  assert setup.cfg.method.mma_backbone == 'samples' and setup.cfg.method.mma_modality == 'samples'
  (full_setup, full_state), _, before_full = _run('ml_ecs', tiny_config, dataset, cache_dir)
  # Faithful ML-ECS: the backbone by samples, the modality leaves by present observations.
  np.testing.assert_array_equal(full_setup.weights, num_samples(full_setup))
  obs = np.stack([[c.train_mask[:, c.modalities.index(m)].sum() if m in c.modalities else 0
                   for m in full_setup.modalities] for c in full_setup.partition.clients])
  np.testing.assert_array_equal(full_setup.modality_weights, obs)
  # without AMT: the private LoRA and gates are never trained.
  (setup, state), _, before = _run('ml_ecs_no_amt', tiny_config, dataset, cache_dir)
  assert 'private' not in setup.stages.private.parts and 'private' not in setup.stages.public.parts
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.cohorts[0].trainables['private']),
               before['private'])
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.tree.map(np.asarray, full_state.cohorts[0].trainables['private']), before_full['private'])
  assert any(jax.tree.leaves(changed))


@pytest.mark.slow
def test_fedavg_with_one_client_equals_local(tiny_config, dataset, tmp_path):
  base = copy.deepcopy(tiny_config)
  base.data.num_clients = 1
  base.data.modality_sets = (('accel', 'depth', 'image'),)
  out = {}
  for name in ('fedavg', 'local'):
    setup, state = federation.init(apply_strategy(base, name), workdir=str(tmp_path), dataset=dataset,
                                   log=lambda s: None)
    for _ in range(2):
      state, _ = federation.run_round(setup, state)
    out[name] = jax.tree.map(np.asarray, state.cohorts[0].trainables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out['fedavg'], out['local'])
