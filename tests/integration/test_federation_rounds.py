"""Rounds of a tiny federation in-process: purity, aggregation semantics, broadcast, checkpoints."""
import contextlib
import copy
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ml_ecs.core import federation
from ml_ecs.run.checkpoint import Checkpointer

# The tests share one federation (`fed`): one xdist worker builds it.
pytestmark = pytest.mark.xdist_group('unit_federation')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('fed'))


@pytest.fixture(scope='module')
def fed(tiny_config, workdir, dataset):
  """(setup, state) of the tiny config."""
  return federation.init(tiny_config, workdir=workdir, dataset=dataset, log=lambda s: None)


def _np(tree):
  return jax.tree.map(np.asarray, tree)


@contextlib.contextmanager
def _traces():
  """The names of the functions JAX traces for jit inside the block."""
  names = []
  def listen(event, duration, **kw):
    if event == '/jax/core/compile/jaxpr_trace_duration':
      names.append(kw.get('fun_name'))
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def test_state_is_a_pytree_and_round_is_pure(fed):
  setup, state = fed
  leaves = jax.tree.leaves(state)
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)
  assert int(state.round) == 0
  # Same (setup, state) in -> same state and metrics out (run_round consumes donated buffers: copy first).
  copy_ = lambda s: jax.tree.map(jnp.copy, s)
  with _traces() as first:
    s1, m1 = federation.run_round(setup, copy_(state))
  with _traces() as second:
    s2, m2 = federation.run_round(setup, copy_(state))
  # The first round's programs are compiled together ahead of their calls (ml_ecs.core.compile_ahead), each
  # traced once: the calls find them (a mismatch in shapes or shardings would trace the call again).
  assert first.count('round_fn') == len(setup.cohorts) and first.count('server_round') == 1, first
  assert 'round_fn' not in second and 'server_round' not in second, second
  jax.tree.map(np.testing.assert_array_equal, _np(s1), _np(s2))
  assert {k: v for k, v in m1.items() if not k.startswith('time/')} == \
      {k: v for k, v in m2.items() if not k.startswith('time/')}
  assert int(s1.round) == 1 and not np.array_equal(np.asarray(s1.rng), np.asarray(state.rng))
  # the round's parts (timing.jsonl) add up to the round
  parts = [m1[f'time/{p}_s'] for p in ('cohorts', 'aggregate', 'server')]
  assert all(p >= 0 for p in parts) and sum(parts) == pytest.approx(m1['time/round_s'], rel=1e-6)


def test_two_rounds_aggregate_shared_and_keep_private(fed):
  setup, state = fed
  state = jax.tree.map(jnp.copy, state)
  init = [_np(c.trainables) for c in state.cohorts]
  state, metrics = federation.run_round(setup, state)
  for k in ('client/private_lm', 'client/private_ccl', 'client/public_se_ccl', 'server/lm', 'server/se_ccl'):
    assert np.isfinite(metrics[k]), k
  assert metrics['mma/excluded'] == 0 and metrics['comm/ratio'] > 0
  # The new global shared LoRA is the MMA mean of the clients' locally trained shared LoRA.
  # Backbone leaves by the client weights, modality leaves by the per-modality weights (faithful default:
  # the client's present observations of the modality; padding clients, id -1, weigh nothing).
  real = lambda ids: ids >= 0
  w = np.concatenate([np.where(real(c.client_ids), setup.weights[c.client_ids], 0) for c in setup.cohorts])
  pres = np.concatenate([np.where(real(c.client_ids)[:, None], setup.modality_weights[c.client_ids], 0)
                         for c in setup.cohorts]).astype(np.float32)
  stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *[_np(c.trainables['shared']) for c in state.cohorts])

  def expected(x, m):
    wl = pres[:, m] if m >= 0 else w
    return np.tensordot(wl, x, 1) / wl.sum()

  ref = jax.tree.map(expected, stacked, setup.leaf_mod)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), _np(state.global_shared), ref)
  # Local training changed every part on every client; the first cohort's two clients stay distinct.
  for c, before in zip(state.cohorts, init):
    for part in ('shared', 'private', 'encoders', 'connector'):
      diff = jax.tree.map(lambda a, b: np.abs(a - b).reshape(a.shape[0], -1).max(1), _np(c.trainables[part]), before[part])
      assert (np.max(np.stack(jax.tree.leaves(diff)), axis=0) > 0).all(), part
  two = state.cohorts[0]
  assert len(setup.cohorts[0].client_ids) == 2
  for part in ('private', 'encoders'):
    leaves = jax.tree.leaves(_np(two.trainables[part]))
    assert any(not np.allclose(x[0], x[1]) for x in leaves), part
  state, metrics2 = federation.run_round(setup, state)
  assert metrics2['round'] == 2
  ev = federation.evaluate(setup, state)
  assert set(ev['client/rougeLsum']) == {str(c.client_id) for c in setup.partition.clients}
  assert 0.0 <= ev['server/rougeLsum'] <= 1.0 and 0.0 <= ev['client/accuracy_mean'] <= 1.0


def test_private_ccl_metric_leaves_out_single_modality_clients(fed):
  setup, state = fed
  single = [c for c in setup.cohorts if c.program.num_modalities < 2]
  assert single, 'the tiny config has a depth-only client'
  out = single[0].round_fn(*(jax.tree.map(jnp.copy, x) for x in (state.cohorts[-1].trainables,
                                                                  state.cohorts[-1].opt_state)),
                           single[0].data.train, single[0].data.public, jnp.arange(single[0].num_selected),
                           jax.random.key(0), state.global_shared, state.server_z, setup.edge_frozen)
  # Text-anchored GRAM (the default) gives a single-modality client a CCL term (answer text <-> its
  # modality); with the modality anchor it has none and run_round leaves its zero out of the mean.
  assert single[0].program.has_ccl and float(np.min(np.abs(np.asarray(out.metrics['private_ccl'])))) > 0.0
  assert not dataclasses.replace(single[0].program, ccl_anchor='modality').has_ccl
  _, metrics = federation.run_round(setup, jax.tree.map(jnp.copy, state))
  multi = sum(c.num_sampled for c in setup.cohorts if c.program.num_modalities >= 2)
  assert multi >= 1 and metrics['clients/sampled'] > multi


def test_broadcast_replaces_shared_and_keeps_private(tiny_config, workdir, dataset):
  cfg = copy.deepcopy(tiny_config)
  cfg.train.update(dict(public_steps=0, private_steps=0, server_steps=1))
  setup, state = federation.init(cfg, workdir=workdir, dataset=dataset, log=lambda s: None)
  key = jax.random.key(5)
  noisy = lambda t: jax.tree.map(lambda x: x + jax.random.normal(key, x.shape), t)
  cohorts = tuple(dataclasses.replace(c, trainables={**c.trainables, 'shared': noisy(c.trainables['shared']),
                                                     'private': noisy(c.trainables['private'])})
                  for c in state.cohorts)   # every client's parts distinct and nonzero
  g = jax.tree.map(lambda x: x + 1.0, state.global_shared)
  state = dataclasses.replace(state, cohorts=cohorts, global_shared=g)
  before = [_np(c.trainables) for c in state.cohorts]
  state, _ = federation.run_round(setup, state)
  for c, b in zip(state.cohorts, before):
    jax.tree.map(lambda x, gg: np.testing.assert_array_equal(x, np.broadcast_to(gg, x.shape)),
                 _np(c.trainables['shared']), _np(g))
    for part in ('private', 'encoders', 'connector'):
      jax.tree.map(np.testing.assert_array_equal, _np(c.trainables[part]), b[part])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), _np(state.global_shared), _np(g))


def test_checkpoint_roundtrip_and_fallback(fed, tmp_path):
  _, state = fed
  ckpt = Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=3)
  ckpt.save(2, state, {'round': 2, 'rows': [{'round': 0}]})
  later = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  ckpt.save(3, later, {'round': 3, 'rows': [{'round': 0}, {'round': 3}]})
  template = jax.tree.map(jnp.zeros_like, state)
  restored, meta = ckpt.restore(template)
  jax.tree.map(np.testing.assert_array_equal, _np(restored), _np(later))
  assert ckpt.latest_step() == 3 and meta['rows'][-1]['round'] == 3
  assert isinstance(restored, federation.State)
  # Damage the newest step: the previous one is restored, with a warning naming the damaged one.
  files = [os.path.join(d, f) for d, _, fs in os.walk(ckpt.step_dir(3)) for f in fs]
  victim = max((f for f in files if os.sep + 'state' + os.sep in f), key=os.path.getsize)
  with open(victim, 'r+b') as f:
    f.truncate(max(os.path.getsize(victim) // 3, 1))
  warnings = []
  step, restored, meta = ckpt.restore_latest_valid(template, warnings.append)
  assert step == 2 and meta['round'] == 2
  assert len(warnings) == 1 and ckpt.step_dir(3) in warnings[0]
  jax.tree.map(np.testing.assert_array_equal, _np(restored), _np(state))
  ckpt.close()


def test_bad_method_config_is_a_clear_error(tiny_config):
  from ml_ecs.config.validation import ConfigError, validate
  cfg = copy.deepcopy(tiny_config)
  cfg.method.mma_backbone = 'median'
  with pytest.raises(ConfigError, match=r"method.mma_backbone = 'median': expected one of \('samples'"):
    validate(cfg)
  cfg = copy.deepcopy(tiny_config)
  cfg.edge_model.backbone.lora_targets = ('qkv', 'attn')
  with pytest.raises(ConfigError, match='edge_model.backbone.lora_targets'):
    validate(cfg)
