"""benchmarks.lib.throughput: every variant it times runs the same local update as the federation (tiny sizes)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ml_ecs.algorithms.fedavg import FedAvg
from ml_ecs.algorithms.ml_ecs import amt
from benchmarks.lib import throughput as bench
from ml_ecs.core import federation

# Every test uses the module's `setup` (and most `loop_result`): one xdist worker makes them.
pytestmark = pytest.mark.xdist_group('bench')
# Adam's first steps move each weight by ~lr * sign(grad); float reassociation between a batched
# and an unbatched program changes results in the last bits only.
ATOL, RTOL = 2e-4, 1e-3


def _run(setup, name):
  v = bench.make_variant(setup, name)
  state = v.init()
  v.compile(state)
  state = v.call(state)
  jax.block_until_ready(state)
  return v, v.trainables(state)


def _assert_same(a, b, what):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL, rtol=RTOL, err_msg=what)


@pytest.fixture(scope='module')
def setup():
  return bench.make_setup(4, 'small', steps=1, width=32, layers=1, heads=2, samples_per_client=8)


@pytest.fixture(scope='module')
def loop_result(setup):
  return _run(setup, 'loop')[1]


def test_vmap_and_chunked_match_loop(setup, loop_result):
  before = setup.trainables
  moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
              for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(loop_result)))
  assert moved > 1e-4, 'the local update did not change the trainables'
  _assert_same(loop_result, _run(setup, 'vmap')[1], 'vmap vs loop')
  _assert_same(loop_result, _run(setup, 'vmap_chunk2')[1], 'vmap_chunk2 vs loop')


def test_limit_runs_and_is_the_same_update(setup, loop_result):
  # Two clients with identical data and keys: the shared-weights step over both (one batch of 2*b
  # samples, mean loss, one optimizer update) must equal that client's own update.
  v, tr = _run(setup.select([0, 0]), 'limit')
  assert v.mem and v.mem['arg'] > 0
  _assert_same(jax.tree.map(lambda x: x[:1], loop_result), tr, 'limit (shared weights) vs loop')


def test_flower_round_matches_loop(setup, loop_result):
  pytest.importorskip('flwr')
  # Round 1 starts every client from the same shared LoRA (the round-0 broadcast), so each client's
  # state after one Flower round is its loop update.
  _assert_same(loop_result, _run(setup, 'flower')[1], 'flower vs loop')


def test_time_variant_and_report(setup):
  row = bench.time_variant(bench.make_variant(setup, 'loop'), repeats=1, budget_s=60, max_mem=2**32)
  assert row['client_steps_per_s'] > 0 and row['peak_bytes'] > 0
  skipped = bench.time_variant(bench.make_variant(setup, 'vmap'), repeats=1, budget_s=1.0, max_mem=2**32,
                               projected_s=10.0)
  assert 'cell_budget_s' in skipped['skip']
  per_client = bench.per_client_bytes(setup)
  assert per_client['frozen_backbone_once'] > 0
  assert per_client['total'] == sum(v for k, v in per_client.items() if k not in ('total', 'frozen_backbone_once'))
  md = bench.markdown([row, skipped], {'small': dict(per_client=per_client, text=setup.text_lens)},
                      bench.machine_info(), 'python benchmarks/throughput.py', {'steps': 1}, 1.0)
  assert '| small | 4 | loop |' in md and 'skipped' in md


def test_vmap_is_the_federation_cohort_update(setup):
  """The benchmark's vmap (cohort_map of the private stage) equals what the federation's own jitted
  cohort round computes on the same stacked state, data and keys: make_cohort_round with a stage
  set whose public stage is empty and whose private stage is the benchmark's spec."""
  s = setup
  stages = amt.Stages(public=dataclasses.replace(s.spec, steps=0), private=s.spec, server=s.spec)
  round_fn = federation.make_cohort_round(FedAvg(), s.program, stages, federation.client_mesh(1), chunk=0,
                                          communicate=False, full=True)
  rng = jax.random.key(7)
  positions = jnp.arange(s.clients)
  # The federation folds the client position into the round key, then amt.client_update splits it
  # into (public, private) stage keys: the benchmark gets the private ones.
  keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(rng, i))[1])(positions)
  copy = lambda t: jax.tree.map(lambda x: x.copy(), t)
  opt = {'public': (), 'private': copy(s.opt_state)}
  out = round_fn(copy(s.trainables), opt, s.data, s.data, positions, rng,
                 jax.tree.map(lambda x: x[0], s.trainables['shared']), jnp.zeros((1, 1)), s.frozen)
  bench_tr = _run(dataclasses.replace(s, keys=keys), 'vmap')[1]
  _assert_same(out.trainables, bench_tr, 'federation cohort round vs benchmark vmap')


def test_round_variants_agree(setup, loop_result):
  """ours (shard_map + chunked vmap + the MMA mean), ours_vmap and the DrJAX round compute the same round:
  every client's update is its loop update, and the new global shared LoRA is their sample-weighted mean."""
  pytest.importorskip('drjax')
  results = {}
  for kind in bench.ROUND_KINDS:
    v = bench.make_variant(setup, f'{kind}@1', round_chunk=2)
    state = v.init()
    v.compile(state)
    state = v.call(state)
    jax.block_until_ready(state)
    assert v.collectives == {op: 0 for op in bench.COLLECTIVES}
    results[kind] = (v.trainables(state), v.global_shared)
  w = np.asarray(setup.data.count, np.float64)
  expected = jax.tree.map(lambda x: np.tensordot(w / w.sum(), np.asarray(x), axes=1), loop_result['shared'])
  for kind, (tr, global_shared) in results.items():
    _assert_same(loop_result, tr, f'{kind} round vs loop')
    _assert_same(expected, global_shared, f'{kind} aggregate vs weighted mean')
  assert bench.variant_names(['drjax'], [], 4, (1, 4)) == [f'{k}@{d}' for d in (1, 4) for k in bench.ROUND_KINDS]
