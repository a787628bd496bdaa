"""The main job at scale: the synthetic source, partitions of many clients, sampled evaluation."""
import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ml_ecs.core import federation
from ml_ecs.data import synthetic
from ml_ecs.data.loaders import load_dataset
from ml_ecs.data.partition import partition
from tests.unit.test_scale import _host_cfg, _scale_cfg  # noqa: F401  (the configs the unit tests use)


def test_evaluation_samples_clients_deterministically_by_round(tiny_config, dataset, tmp_path):
  cfg = copy.deepcopy(tiny_config)
  cfg.eval.clients_per_eval = 1
  setup, state = federation.init(cfg, workdir=str(tmp_path), dataset=dataset, log=lambda s: None)
  pos = federation.eval_positions(setup, 0)
  # One client per cohort: drawn where a cohort has more (None = the cohort's only client).
  assert [c.num_real if p is None else len(p) for p, c in zip(pos, setup.cohorts)] == [1] * len(setup.cohorts)
  assert any(p is not None for p in pos)
  assert all(p is q or np.array_equal(p, q) for p, q in zip(pos, federation.eval_positions(setup, 0)))
  out = federation.evaluate(setup, state)
  assert out['client/evaluated'] == len(out['client/rougeLsum']) == len(setup.cohorts) < 3
  again = federation.evaluate(setup, state)
  assert again['client/rougeLsum'] == out['client/rougeLsum']


def test_host_state_moves_only_the_sampled_block_and_compiles_once(tiny_config, dataset, tmp_path):
  cfg = _host_cfg(tiny_config)
  setup, state = federation.init(cfg, workdir=str(tmp_path), dataset=dataset, log=lambda s: None)
  assert all(type(x) is np.ndarray and x.flags.writeable for cs in state.cohorts for x in jax.tree.leaves(cs))
  # Shapes of whole-cohort state (cohorts larger than their sampled block; stacked matrices and up).
  cohort_shapes = {x.shape for c, cs in zip(setup.cohorts, state.cohorts) if len(c.client_ids) > c.num_selected
                   for x in jax.tree.leaves(cs) if x.ndim >= 3}
  assert cohort_shapes
  # Arrays other tests of this worker keep alive (fixtures, caches) may share a shape: only new ones count.
  earlier = {id(x) for x in jax.live_arrays()}
  seen = []

  def spy(c):
    def fn(*args):
      seen.append((c.num_selected, tuple(np.asarray(args[4]).tolist()),
                   [(type(x), x.shape[0]) for x in jax.tree.leaves(args[:4])]))
      return c.round_fn(*args)
    return fn
  spied = dataclasses.replace(setup, cohorts=tuple(dataclasses.replace(c, round_fn=spy(c)) for c in setup.cohorts))
  rows = []
  for _ in range(4):
    state, m = federation.run_round(spied, state)
    rows.append(m)
    # No device array the size of a whole cohort's state exists between rounds.
    assert not cohort_shapes & {x.shape for x in jax.live_arrays() if id(x) not in earlier}
  assert any(n < len(c.client_ids) for n, c in zip([c.num_selected for c in setup.cohorts], setup.cohorts))
  # The compiled round received device arrays of the sampled block only ...
  assert len(seen) == 4 * len(setup.cohorts)
  assert all(all(issubclass(t, jax.Array) and n == num for t, n in leaves) for num, _, leaves in seen)
  # ... sampled sets differed between rounds, and each cohort's round compiled once.
  assert len({sel for _, sel, _ in seen[0::len(setup.cohorts)]}) > 1
  assert [c.round_fn._cache_size() for c in setup.cohorts] == [1] * len(setup.cohorts)
  # Sampled evaluation of two rounds and a full evaluation (in blocks) reuse one compiled decoder.
  sampled = federation.evaluate(setup, state)
  full = federation.evaluate(setup, state, full=True)
  state1 = dataclasses.replace(state, round=state.round + 1)
  federation.evaluate(setup, state1)
  assert sampled['client/evaluated'] == 2 and full['client/evaluated'] == 3 == len(full['client/rougeLsum'])
  assert [c.generate_fn._cache_size() for c in setup.cohorts] == [1] * len(setup.cohorts)
  # The same federation with its state on the devices trains to the same numbers.
  cfg.train.host_state = False
  dev_setup, dev_state = federation.init(cfg, workdir=str(tmp_path), dataset=dataset, log=lambda s: None)
  for m in rows:
    dev_state, dm = federation.run_round(dev_setup, dev_state)
    for k in ('client/private_lm', 'client/public_lm', 'server/lm', 'comm/bytes_up'):
      np.testing.assert_allclose(m[k], dm[k], rtol=1e-5, err_msg=k)
  for h, d in zip(jax.tree.leaves(state.cohorts), jax.tree.leaves(dev_state.cohorts)):
    np.testing.assert_allclose(h, np.asarray(d), rtol=1e-4, atol=1e-6)
  assert full == federation.evaluate(dev_setup, dev_state, full=True) | {'time/eval_s': full['time/eval_s']}


def test_host_state_checkpoint_round_trip_resumes_exactly(tiny_config, dataset, tmp_path):
  from ml_ecs.run.checkpoint import Checkpointer
  cfg = _host_cfg(tiny_config)
  cfg.train.dropout_rate = 0.3   # fault draws come from the round key: they must resume too
  setup, state = federation.init(cfg, workdir=str(tmp_path), dataset=dataset, log=lambda s: None)
  state, _ = federation.run_round(setup, state)
  ckpt = Checkpointer(str(tmp_path / 'ckpt'))
  ckpt.save(1, state, {'round': 1})
  straight = []
  for _ in range(2):
    state, m = federation.run_round(setup, state)
    straight.append(m)
  restored, meta = ckpt.restore(state)   # the template: any state of this config
  ckpt.close()
  assert meta['round'] == 1 and int(restored.round) == 1
  assert all(type(x) is np.ndarray and x.flags.writeable for x in jax.tree.leaves(restored.cohorts))
  for m in straight:
    restored, rm = federation.run_round(setup, restored)
    assert {k: v for k, v in rm.items() if not k.startswith('time/')} == \
        {k: v for k, v in m.items() if not k.startswith('time/')}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
