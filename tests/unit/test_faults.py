"""Faults, divergence, robust aggregation and central DP (ml_ecs.core.faults, ml_ecs.aggregation.robust, ml_ecs.aggregation.privacy)."""
import dp_accounting
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ml_ecs.core import faults
from ml_ecs.algorithms.ml_ecs import mma
from ml_ecs.aggregation import dp, mean, privacy, robust


def _train_cfg(**kw):
  base = dict(dropout_rate=0.0, straggler_rate=0.0, straggler_slowdown=2.0, deadline=1.5, straggler_policy='drop')
  return ml_collections.ConfigDict({**base, **kw})


def _clients(n=6, d=5, seed=0, scale=0.1):
  """A global pytree and n uploads = global + small updates, with a modality leaf."""
  rng = np.random.default_rng(seed)
  prev = {'a': jnp.asarray(rng.normal(size=(d,)), jnp.float32), 'm': jnp.asarray(rng.normal(size=(2, d)), jnp.float32)}
  up = jax.tree.map(lambda p: p[None] + scale * jnp.asarray(rng.normal(size=(n,) + p.shape), jnp.float32), prev)
  return prev, up, {'a': -1, 'm': 0}


def _agg(up, prev, leaf_mod, w=None, pres=None, **kw):
  n = jax.tree.leaves(up)[0].shape[0]
  w = jnp.ones(n) if w is None else jnp.asarray(w, jnp.float32)
  pres = jnp.ones((n, 1)) if pres is None else jnp.asarray(pres, jnp.float32)
  return robust.aggregate([up], [w], [pres], prev, jax.random.key(0), leaf_mod=leaf_mod, modality_aware=True, **kw)


def test_fault_draws_are_deterministic_and_have_the_configured_rate():
  cfg = _train_cfg(dropout_rate=0.2)
  a = faults.draw_faults(jax.random.key(3), 10, cfg)
  b = faults.draw_faults(jax.random.key(3), 10, cfg)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  # 20% dropout over many rounds: the observed rate and the survivors' weights.
  dropped = np.concatenate([faults.draw_faults(jax.random.fold_in(jax.random.key(0), r), 10, cfg)[1]
                            for r in range(400)])
  assert abs(dropped.mean() - 0.2) < 0.03
  factor, dropped, late = faults.draw_faults(jax.random.key(1), 1000, _train_cfg(straggler_rate=1.0, deadline=2.0,
                                                                                  straggler_slowdown=1.0))
  assert not dropped.any() and abs(late.mean() - np.exp(-1.0)) < 0.05   # P(Exp(1) > 1)
  assert (factor[late] == 0).all() and (factor[~late] == 1).all()
  factor, _, late = faults.draw_faults(jax.random.key(1), 1000, _train_cfg(
      straggler_rate=1.0, deadline=2.0, straggler_slowdown=1.0, straggler_policy='discount'))
  assert (factor[late] > 0).all() and (factor[late] < 1).all() and (factor[~late] == 1).all()


def test_survivors_are_renormalised():
  prev, up, leaf_mod = _clients(4)
  out = _agg(up, prev, leaf_mod, w=[1.0, 0.0, 3.0, 0.0])     # clients 1 and 3 dropped
  expect = (up['a'][0] + 3 * up['a'][2]) / 4
  np.testing.assert_allclose(out.shared['a'], expect, rtol=1e-6)
  assert int(out.participated.sum()) == 2


def test_plain_robust_mean_equals_the_modality_mean():
  prev, up, leaf_mod = _clients(5)
  pres = np.array([[1], [0], [1], [1], [0]], np.float32)
  w = jnp.array([1.0, 2.0, 3.0, 1.0, 1.0])
  ref, _ = mean.modality_mean([up], [w], [jnp.asarray(pres)], prev, leaf_mod, True)
  out = _agg(up, prev, leaf_mod, w=w, pres=pres)
  for k in ref:
    np.testing.assert_array_equal(out.shared[k], ref[k])


@pytest.mark.parametrize('rule,kw', [('norm_outlier', {}), ('mean', {'clip_norm': 1.0}), ('trimmed_mean', {'trim_fraction': 0.2}),
                                     ('median', {})])
def test_a_huge_update_is_rejected_or_clipped(rule, kw):
  prev, up, leaf_mod = _clients(6)
  huge = jax.tree.map(lambda x: x.at[2].add(1e6 / np.sqrt(x[2].size * 2)), up)     # norm ~ 1e6
  out = _agg(huge, prev, leaf_mod, rule=rule, **kw)
  assert float(out.norms[2]) > 5e5
  if rule == 'norm_outlier':
    assert np.asarray(out.rejected).tolist() == [False, False, True, False, False, False]
  if rule == 'mean':
    assert bool(out.clipped[2]) and int(out.clipped.sum()) == 1
  for k in prev:   # the global model moves by about a normal update, not by 1e6
    assert float(jnp.abs(out.shared[k] - prev[k]).max()) < 1.0, (rule, k)
  plain = _agg(huge, prev, leaf_mod)
  assert float(jnp.abs(plain.shared['a'] - prev['a']).max()) > 1e4   # what FedAvg does with it


def test_nan_upload_excluded_and_counted():
  prev, up, leaf_mod = _clients(4)
  up = jax.tree.map(lambda x: x.at[1].set(jnp.nan), up)
  out = _agg(up, prev, leaf_mod, rule='norm_outlier', clip_norm=10.0)
  assert np.asarray(out.nonfinite).tolist() == [False, True, False, False]
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(out.shared))


def test_dp_with_no_noise_and_a_loose_bound_equals_fedavg():
  prev, up, leaf_mod = _clients(5)
  w = jnp.array([10.0, 20.0, 5.0, 7.0, 8.0])   # sample counts: FedAvg weights
  fedavg, _ = mean.modality_mean([up], [w], [jnp.ones((5, 1))], prev, leaf_mod, False)
  dp = robust.aggregate([up], [w], [jnp.ones((5, 1))], prev, jax.random.key(0), leaf_mod=leaf_mod,
                        modality_aware=False, clip_norm=1e9, noise_multiplier=0.0)
  for k in prev:
    np.testing.assert_allclose(dp.shared[k], fedavg[k], rtol=1e-5, atol=1e-6)


def test_dp_noise_has_the_calibrated_std():
  n, z, s = 4, 0.5, 0.01
  prev = {'a': jnp.zeros((20000,))}
  up = {'a': jnp.zeros((n, 20000))}
  out = robust.aggregate([up], [jnp.ones(n)], [jnp.ones((n, 1))], prev, jax.random.key(1), leaf_mod={'a': -1},
                         modality_aware=False, clip_norm=s, noise_multiplier=z)
  assert float(jnp.std(out.shared['a'])) == pytest.approx(z * s / n, rel=0.03)


def test_epsilon_grows_with_rounds_as_the_accountant_says():
  dp = ml_collections.ConfigDict(dict(noise_multiplier=1.1, delta=1e-5, accountant='rdp', noise_representations=False,
                                      repr_noise_multiplier=1.0))
  eps = [privacy.epsilon(dp, 0.25, r) for r in (1, 5, 30)]
  assert eps[0] < eps[1] < eps[2]
  acc = dp_accounting.rdp.RdpAccountant(privacy.RDP_ORDERS)
  acc.compose(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.1)), 30)
  assert eps[2] == pytest.approx(acc.get_epsilon(1e-5))
  m = privacy.round_metrics(dp, 0.25, 5)
  assert m['dp/epsilon'] == eps[1] and m['dp/epsilon_round'] == eps[0]
  dp.noise_representations = True     # a second mechanism per round costs privacy
  assert privacy.epsilon(dp, 0.25, 30) > eps[2]
  dp.noise_multiplier = 0.0
  assert privacy.epsilon(dp, 0.25, 1) == float('inf')


def test_representation_noise_clips_and_noises_targets():
  z = jnp.ones((2, 3, 4)) * 10.0
  valid = jnp.ones((2, 3))
  clipped = dp.clip_representations(z, valid, 1.0)
  np.testing.assert_allclose(jnp.sqrt(jnp.sum(clipped ** 2, axis=(1, 2))), [1.0, 1.0], rtol=1e-5)
  ids = jnp.tile(jnp.arange(3), (2, 1))
  targets = jnp.zeros((3, 4))
  same = dp.noise_representation_targets([valid], [jnp.ones(2)], [ids], 3, jax.random.key(0), 1.0, 0.0, targets)
  np.testing.assert_array_equal(same, targets)
  noisy = dp.noise_representation_targets([valid], [jnp.ones(2)], [ids], 3, jax.random.key(0), 1.0, 1.0, targets)
  assert float(jnp.abs(noisy).max()) > 0


def test_resync_resets_only_the_bad_rows():
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(3))
  init = lambda key: {'shared': {'w': jax.random.normal(key, (2,))}, 'private': {'p': jax.random.normal(key, (3,))}}
  init_opt = lambda tr: {'mu': jax.tree.map(jnp.zeros_like, tr)}
  tr = jax.vmap(init)(keys)
  tr = jax.tree.map(lambda x: x + 1.0, tr)
  tr['private']['p'] = tr['private']['p'].at[1].set(jnp.nan)
  opt = {'mu': jax.tree.map(jnp.ones_like, tr)}
  bad = ~faults.clients_finite(tr)
  assert np.asarray(bad).tolist() == [False, True, False]
  global_shared = {'w': jnp.array([5.0, 6.0])}
  fresh = jax.vmap(init)(keys)
  kept = jax.tree.map(lambda x: np.asarray(x), tr)
  new_tr, new_opt = faults.make_resync(init, init_opt, keys)(tr, opt, bad, global_shared)
  np.testing.assert_array_equal(new_tr['shared']['w'][1], [5.0, 6.0])
  np.testing.assert_array_equal(new_tr['private']['p'][1], fresh['private']['p'][1])
  np.testing.assert_array_equal(new_tr['private']['p'][0], kept['private']['p'][0])
  assert float(new_opt['mu']['private']['p'][1].sum()) == 0 and float(new_opt['mu']['private']['p'][0].sum()) == 3


def test_divergence_check_and_finite_means():
  faults.check_round({'round': 3, 'clients/sampled': 3, 'clients/diverged_ids': [1], 'server/diverged': 0})
  with pytest.raises(faults.FederationDiverged, match='round 3: all 3 sampled clients'):
    faults.check_round({'round': 3, 'clients/sampled': 3, 'clients/diverged_ids': [0, 1, 2]})
  with pytest.raises(faults.FederationDiverged, match='server'):
    faults.check_round({'round': 3, 'clients/sampled': 3, 'clients/diverged_ids': [], 'server/diverged': 1})
  assert faults.finite_mean([np.array([1.0, np.nan]), np.array([3.0])]) == 2.0
