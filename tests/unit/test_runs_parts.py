"""The parts of many federations as one program (ml_ecs.core.runs) that need no federation: which configs may
share a program, padding on the run axis, every run's view of a stacked state (the end-to-end equality with
separate runs: tests/integration/test_runs.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ml_ecs.core import runs as runs_lib
from ml_ecs.core.state import NodeState, State


def test_configs_may_differ_in_seeds_and_learning_rate_only(tiny_config):
  a, b = tiny_config.copy_and_resolve_references(), tiny_config.copy_and_resolve_references()
  b.seed, b.data.seed, b.train.learning_rate = 7, 9, 3e-3
  runs_lib.check_configs([a, b])
  b.method.lambda_ccl = 0.5
  b.train.rounds = 9
  with pytest.raises(ValueError, match=r"run 1 differs from run 0 in \['method.lambda_ccl', 'train.rounds'\]"):
    runs_lib.check_configs([a, b])
  with pytest.raises(ValueError, match='at least one config'):
    runs_lib.check_configs([])


def test_pad_stack_pads_the_row_axis_with_zeros():
  a = {'x': jnp.ones((2, 3, 4)), 'count': jnp.array([3, 1])}
  b = {'x': 2 * jnp.ones((2, 5, 4)), 'count': jnp.array([5, 2])}
  out = runs_lib._pad_stack([a, b], 1)
  assert out['x'].shape == (2, 2, 5, 4) and out['count'].shape == (2, 2)
  np.testing.assert_array_equal(out['x'][0, :, 3:], 0.0)
  np.testing.assert_array_equal(out['x'][0, :, :3], 1.0)
  np.testing.assert_array_equal(out['x'][1], 2.0)


def _state(v: float) -> State:
  node = NodeState({'w': jnp.full((3, 2), v)}, {'m': jnp.full((3,), v)})
  return State(cohorts=(node,), server=NodeState({'w': jnp.full((2,), v)}, {}), global_shared={'g': jnp.full((2,), v)},
               server_z=jnp.full((4, 2), v), round=jnp.asarray(int(v), jnp.int32),
               rng=jax.random.key_data(jax.random.key(int(v))), algorithm={})


def test_views_give_back_each_stacked_run():
  states = [_state(1.0), _state(2.0), _state(3.0)]
  stacked = runs_lib.stack(states)
  assert stacked.cohorts[0].trainables['w'].shape == (3, 3, 2)
  for r, (v, s) in enumerate(zip(runs_lib.views(stacked, cohorts=True), states)):
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(s)):
      np.testing.assert_array_equal(a, b)
  assert runs_lib.views(stacked)[1].cohorts == ()   # without cohorts unless asked
