"""The parts of many federations as one program (ml_ecs.core.runs) that need no federation: which configs may
share a program, padding on the run axis, every run's view of a stacked state (the end-to-end equality with
separate runs: tests/integration/test_runs.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ml_ecs.core import runs as runs_lib
from ml_ecs.core.state import NodeState, State


def test_configs_may_differ_in_seeds_and_tuned_hyperparameters_only(tiny_config):
  a, b = tiny_config.copy_and_resolve_references(), tiny_config.copy_and_resolve_references()
  a.method.lambda_ccl, a.method.lambda_se_ccl = 0.3, 0.2
  b.seed, b.data.seed, b.train.learning_rate = 7, 9, 3e-3
  b.method.lambda_ccl, b.method.tau_ccl, b.method.lambda_se_ccl, b.method.tau_se_ccl = 0.5, 0.3, 0.7, 0.4
  b.method.mma_backbone = 'modality'                      # host-side client weights only
  runs_lib.check_configs([a, b])
  assert runs_lib.program_key(a) == runs_lib.program_key(b)
  b.method.mma_modality = 'client'                        # compiled into the aggregation: not a run field
  b.train.rounds = 9
  with pytest.raises(ValueError, match=r"run 1 differs from run 0 in \['method.mma_modality', 'train.rounds'\]"):
    runs_lib.check_configs([a, b])
  c = a.copy_and_resolve_references()
  c.method.lambda_ccl = 0.0                               # CCL off: another program
  with pytest.raises(ValueError, match=r"turns \['method.lambda_ccl'\] on or off"):
    runs_lib.check_configs([a, c])
  assert runs_lib.program_key(a) != runs_lib.program_key(c)
  d, e = a.copy_and_resolve_references(), a.copy_and_resolve_references()
  d.method.modality_dropout, e.method.modality_dropout = 0.2, 0.5   # the dropout's rate is state ...
  runs_lib.check_configs([d, e])
  with pytest.raises(ValueError, match=r"turns \['method.modality_dropout'\] on or off"):   # ... being on is not
    runs_lib.check_configs([a, d])
  with pytest.raises(ValueError, match='at least one config'):
    runs_lib.check_configs([])


def test_init_refuses_a_run_of_other_structure_before_building_the_rest(tiny_config, monkeypatch):
  from types import SimpleNamespace
  cfgs = [tiny_config.copy_and_resolve_references() for _ in range(4)]
  for r, c in enumerate(cfgs):
    c.data.seed = r
  cohort = lambda real: SimpleNamespace(data=SimpleNamespace(modalities=('a',)), client_ids=[0, 1], num_real=real,
                                        num_selected=1, host=False)
  built = []

  def fake_build(cfg, **kw):   # run 1's partition leaves its cohort one real client short
    built.append(cfg.data.seed)
    return SimpleNamespace(cohorts=[cohort(1 if cfg.data.seed == 1 else 2)], num_public=8), None

  monkeypatch.setattr(runs_lib.build, 'init', fake_build)
  with pytest.raises(runs_lib.DifferentStructure, match='run 1 has cohorts'):
    runs_lib.init(cfgs, dataset=object(), log=lambda s: None)
  assert built == [0, 1]      # runs 2 and 3 were never built


def test_stacking_once_pads_the_row_axis_with_zeros():
  a = {'x': jnp.ones((2, 3, 4)), 'count': jnp.array([3, 1])}
  b = {'x': 2 * jnp.ones((2, 5, 4)), 'count': jnp.array([5, 2])}
  out = runs_lib._stack_once([a, b], 1)
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


def test_loss_hyperparameters_ride_in_the_optimizer_state_and_replace_the_weights_of_terms_that_are_on(tiny_config):
  from ml_ecs.core.node import NodeProgram, StageSpec, make_optimizer, stage_hparams, state_hparams
  cfg = tiny_config.copy_and_resolve_references()
  params = {'w': jnp.ones(3)}
  state = make_optimizer(cfg.train, 0, True, {'lambda_ccl': 0.5, 'tau_ccl': 0.2}).init(params)
  hp = state_hparams(state)
  assert set(hp) == {'lambda_ccl', 'tau_ccl'} and float(hp['lambda_ccl']) == 0.5   # not the learning rate
  assert state_hparams(make_optimizer(cfg.train).init(params)) == {}               # a single run: constants
  with pytest.raises(ValueError, match='lambda_typo'):
    make_optimizer(cfg.train, 0, True, {'lambda_typo': 1.0})
  # the modality dropout's rate rides along only where it is on: other methods' states keep their structure
  assert 'modality_dropout' not in stage_hparams(cfg.method)
  cfg.method.modality_dropout = 0.3
  assert stage_hparams(cfg.method)['modality_dropout'] == pytest.approx(0.3)
  assert float(state_hparams(make_optimizer(cfg.train, 0, True, stage_hparams(cfg.method)).init(params))[
      'modality_dropout']) == pytest.approx(0.3)
  terms = {'lm': jnp.asarray(1.0), 'ccl': jnp.asarray(2.0), 'ccl_anchors': jnp.asarray(7.0)}
  on = StageSpec(1, ('shared',), lambda_ccl=0.1)
  assert float(NodeProgram.total(terms, on)) == pytest.approx(1.0 + 0.1 * 2.0)
  assert float(NodeProgram.total(terms, on, hp)) == pytest.approx(1.0 + 0.5 * 2.0)   # the state's weight
  # a term the stage has off stays off whatever the state holds (on/off is part of the program)
  off = StageSpec(1, ('shared',))
  assert float(NodeProgram.total({'lm': jnp.asarray(1.0)}, off, hp)) == pytest.approx(1.0)
  opt = make_optimizer(cfg.train, 0, True, {'lambda_ccl': 0.5})
  updates, _ = opt.update({'w': jnp.ones(3)}, opt.init(params), params)   # the optimizer ignores them
  ref = make_optimizer(cfg.train, 0, True)
  ref_updates, _ = ref.update({'w': jnp.ones(3)}, ref.init(params), params)
  np.testing.assert_array_equal(updates['w'], ref_updates['w'])


def test_builds_sharing_traced_inits_start_where_separate_builds_start(tiny_config, dataset, tmp_path):
  # runs.init hands every build of a program one `jit_cache`: a later run reuses the models' traced inits
  # and graphs, whatever its seeds (the training seed, which the shared modules' init reads, is an argument
  # of the compiled init), and its models start where a separate build's start.
  from ml_ecs.core import build
  cfgs = [tiny_config.copy_and_resolve_references() for _ in range(3)]
  for c, (seed, data_seed) in zip(cfgs, [(0, 0), (0, 4), (1, 4)]):
    c.seed, c.data.seed = seed, data_seed
  quiet, cache = (lambda s: None), str(tmp_path)
  shared, sizes, together = {}, [], []
  for c in cfgs:
    together.append(build.init(c, dataset=dataset, log=quiet, cache_dir=cache, hparams_in_state=True,
                               jit_cache=shared)[1])
    sizes.append(len(shared))
  assert sizes[0] > 0 and sizes[1] == sizes[0] and sizes[2] == sizes[0]   # seed 1 reuses them too
  inits = [fn for key, fn in shared.items() if key[0] == 'init']
  assert inits and all(fn._cache_size() == 1 for fn in inits)   # each compiled once for the three builds
  for c, state in zip(cfgs[1:], together[1:]):
    alone = build.init(c, dataset=dataset, log=quiet, cache_dir=cache, hparams_in_state=True)[1]
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  first, third = (jax.tree.leaves(s.server.trainables) for s in (together[0], together[2]))
  assert any(not np.array_equal(a, b) for a, b in zip(first, third))   # the training seed reaches the models


def test_run_devices_are_checked():
  """How many devices a program's run axis goes over (split programs end to end: tests/integration/test_runs_split.py)."""
  from ml_ecs.core import build
  with pytest.raises(ValueError, match='run_devices=0'):
    runs_lib.run_split(4, 0)
  assert runs_lib.run_split(10, 4) == 2 and runs_lib.run_split(3, 2) == 1
  with pytest.raises(ValueError, match='run_devices=2: expected a divisor'):
    build.client_mesh(1, 2)


def test_run_batch_is_the_platforms_unless_asked():
  """One run at a time on a CPU, every run at once (vmapped, None) on an accelerator or a split run axis."""
  assert runs_lib.run_batch(10, 1, platform='cpu') == 1
  assert runs_lib.run_batch(10, 1, platform='gpu') is None
  assert runs_lib.run_batch(10, 1, 4, platform='gpu') == 4
  assert runs_lib.run_batch(10, 1, 10, platform='cpu') is None and runs_lib.run_batch(3, 1, 5) is None
  assert runs_lib.run_batch(10, 2, platform='cpu') is None
  with pytest.raises(ValueError, match='run_batch=0'):
    runs_lib.run_batch(10, 1, 0)
  with pytest.raises(ValueError, match='run_batch=2 with the run axis over 2 devices'):
    runs_lib.run_batch(10, 2, 2)


@pytest.mark.parametrize('batch', [None, 1, 2])
def test_a_function_over_runs_computes_each_run_as_alone(batch):
  """All runs vmapped, one after another, or two at a time (the last batch short): each run's result is the
  function's on that run, an argument without a run axis shared by all, the state arguments donated."""
  def step(w, opt, x, shared, maybe):
    assert maybe is None
    return w - 0.1 * (x @ shared).sum() * w, opt + 1.0
  over = runs_lib._over_runs(step, (0, 0, 0, None, None), False, batch, donate_argnums=(0, 1))
  rng = np.random.default_rng(0)
  w, opt, x, shared = (rng.normal(size=s).astype(np.float32) for s in ((5, 3), (5,), (5, 4, 2), (2, 3)))
  expect = [step(w[r], opt[r], x[r], shared, None) for r in range(5)]
  got = over(jnp.asarray(w), jnp.asarray(opt), jnp.asarray(x), jnp.asarray(shared), None)
  for r, (ew, eo) in enumerate(expect):
    np.testing.assert_allclose(got[0][r], ew, rtol=1e-6, err_msg=f'run {r}')
    assert float(got[1][r]) == float(eo)


def test_the_multimodal_baselines_dropout_reads_the_runs_rate():
  """On a run axis the rate comes from the run's optimizer state (`hp`), not the program's constant."""
  import dataclasses
  from ml_ecs.algorithms.mmfl import MMFL

  @dataclasses.dataclass(frozen=True)
  class Batch:
    mod_mask: jax.Array

  batch, key = Batch(jnp.ones((4096, 3))), jax.random.key(0)
  algo = MMFL(zero_fill=True, modality_dropout=0.2)
  kept = lambda hp: float(algo.batch_view(batch, key, hp).mod_mask.mean())
  # the share of 3 present modalities kept at rate p: each kept w.p. 1 - p, all kept again where all were dropped
  expected = lambda p: (1 - p) + p ** 3
  assert kept({}) == kept(None) == pytest.approx(expected(0.2), abs=0.02)   # a single run: its constant
  assert kept({'modality_dropout': jnp.asarray(0.6)}) == pytest.approx(expected(0.6), abs=0.02)
  assert kept({'modality_dropout': jnp.asarray(0.0)}) == 1.0
