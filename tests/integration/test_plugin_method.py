"""A method plugs in without touching the core: FedAvg with server momentum, defined and registered in this
file alone, runs two rounds through the main job's loop (ml_ecs.run.trainer.train), and its aggregate is
checked against numpy."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ml_ecs.algorithms import registry
from ml_ecs.algorithms.base import Aggregated
from ml_ecs.algorithms.fedavg import FedAvg
from ml_ecs.run.checkpoint import Checkpointer
from ml_ecs.run.trainer import train

RECORD = []   # per round: what the aggregator saw and returned, as numpy


@dataclasses.dataclass(frozen=True)
class ServerMomentum(FedAvg):
  """FedAvgM (Hsu et al., 2019): the server applies the mean client update through heavy-ball momentum."""
  name = 'test_fedavg_momentum'
  beta: float = 0.5
  server_lr: float = 1.5

  def init_state(self, global_shared):
    return {'momentum': jax.tree.map(jnp.zeros_like, global_shared)}

  def aggregate(self, setup, state, uploads, key):
    plain = super().aggregate(setup, state, uploads, key)   # the configured weighted mean
    momentum = jax.tree.map(lambda m, new, prev: self.beta * m + (new - prev), state.algorithm['momentum'],
                            plain.shared, state.global_shared)
    shared = jax.tree.map(lambda prev, m: prev + self.server_lr * m, state.global_shared, momentum)
    host = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
    RECORD.append({'uploads': [host(s) for s in uploads.shared], 'weights': [np.asarray(w) for w in uploads.weights],
                   'previous': host(state.global_shared), 'momentum_before': host(state.algorithm['momentum']),
                   'shared': host(shared), 'momentum': host(momentum)})
    return Aggregated(shared, {'momentum': momentum}, plain.accepted, plain.metrics)


@pytest.fixture
def registered():
  registry.register(ServerMomentum)
  yield
  registry.unregister(ServerMomentum.name)


def test_a_method_registered_in_a_test_file_runs_through_the_main_loop(registered, tiny_config, tmp_path):
  RECORD.clear()
  cfg = registry.apply_strategy(tiny_config, ServerMomentum.name)
  cfg.train.rounds = 2
  result = train(cfg, str(tmp_path), progress=False, log=lambda s: None)
  assert result.status == 'complete' and len(RECORD) == 2
  assert all(np.isfinite(r['client/private_lm']) for r in result.rows[1:])
  for r in RECORD:
    ups = [np.concatenate(leaves) for leaves in zip(*r['uploads'])]   # cohorts concatenated, per leaf
    w = np.concatenate(r['weights']).astype(np.float64)
    assert (w > 0).sum() == cfg.data.num_clients          # every client uploaded, padding weighs 0
    for x, prev, m_before, m, shared in zip(ups, r['previous'], r['momentum_before'], r['momentum'], r['shared']):
      mean = np.tensordot(w, x.astype(np.float64), axes=1) / w.sum()   # FedAvg: sample weights, every leaf
      expected = 0.5 * m_before + (mean - prev)
      np.testing.assert_allclose(m, expected, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(shared, prev + 1.5 * expected, rtol=1e-5, atol=1e-7)
  for a, b, c, d in zip(RECORD[0]['momentum'], RECORD[1]['momentum_before'], RECORD[0]['shared'], RECORD[1]['previous']):
    np.testing.assert_array_equal(a, b)   # the method's state carried from round 1 to round 2
    np.testing.assert_array_equal(c, d)   # what round 2 broadcast
  assert not np.any(RECORD[0]['momentum_before'][0])
  assert np.abs(RECORD[1]['momentum'][0]).max() > 0
  # The method's server state is in the checkpoint (round 2), without any change to State or the format.
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'))
  saved = ckpt.manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  moms = [np.asarray(v) for k, v in sorted(saved.items()) if k.startswith(".algorithm['momentum']")]
  assert len(moms) == len(RECORD[-1]['momentum'])
  np.testing.assert_array_equal(np.sort(np.concatenate([m.ravel() for m in moms])),
                                np.sort(np.concatenate([m.ravel() for m in RECORD[-1]['momentum']])))
