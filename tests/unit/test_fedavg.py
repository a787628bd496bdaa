"""benchmarks.lib.fedavg: the generic FedAvg path of the cohort engine (pfl's CIFAR-10 CNN at a small image size)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.lib import fedavg, pfl_cifar10 as pc
from ml_ecs.core import cohort_map

IMAGE = (8, 8, 3)


def _close(a, b, what, atol=1e-5, rtol=1e-4):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol, err_msg=what)


@pytest.fixture(scope='module')
def population():
  data = pc.synthetic_cifar10(48, 8, IMAGE, seed=3)
  return pc.partition_iid(data['x_train'], data['y_train'], num_users=4, per_user=12, seed=3)


def test_one_client_is_centralised_sgd(population):
  """One client, server SGD at lr 1: the round's new global model is plain minibatch SGD over that client's
  rows in order (2 epochs, batch 4, 10 real rows of 12: the last batch of each epoch has 2 rows)."""
  det_loss = lambda p, batch, rng: pc.loss_fn(p, batch, None)   # no dropout: independent of the keys
  algo = fedavg.FedAvg(det_loss, optax.sgd(0.1), optax.sgd(1.0), batch_size=4, epochs=2)
  params = pc.init_cnn(jax.random.key(0), IMAGE)
  one = fedavg.ClientData(population.x[:1], population.y[:1], np.array([10], np.int32))
  state, metrics = jax.jit(algo.apply)(algo.init(params), one, jax.random.key(1))

  x, y = one.x[0, :10], one.y[0, :10]
  ref, opt = params, optax.sgd(0.1)
  for _ in range(2):
    for lo in range(0, 10, 4):
      batch = (x[lo:lo + 4], y[lo:lo + 4], np.ones(len(x[lo:lo + 4]), bool))
      grads = jax.grad(lambda p: det_loss(p, batch, None)[0])(ref)
      ref = optax.apply_updates(ref, opt.update(grads, opt.init(ref), ref)[0])
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
  assert moved > 1e-3
  _close(state.params, ref, 'one-client FedAvg vs centralised SGD')
  assert int(state.round) == 1 and int(metrics['excluded']) == 0


@pytest.mark.parametrize('chunk', [0, 1, 2])
def test_cohort_update_equals_the_loop(population, chunk):
  """The cohort round (cohort_map over the stacked clients, with dropout keys) equals a Python loop of
  single-client updates followed by the unweighted mean (pfl's WeightByUser) and server SGD at lr 1."""
  algo = pc.make_fedavg(dict(pc.CONFIG, batch=4), chunk=chunk)
  params = pc.init_cnn(jax.random.key(0), IMAGE)
  rng = jax.random.key(5)
  state, _ = jax.jit(algo.apply)(algo.init(params), population, rng)
  update = jax.jit(algo.client_update)
  outs = [update(params, jax.tree.map(lambda a: a[c], population), jax.random.fold_in(rng, c))[0]
          for c in range(population.count.shape[0])]
  mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *outs)
  _close(state.params, mean, f'cohort round (chunk {chunk}) vs loop')


def test_weighting_and_short_training_learns():
  with pytest.raises(ValueError):
    fedavg.FedAvg(pc.loss_fn, optax.sgd(0.1), optax.sgd(1.0), batch_size=4, weighting='modality')
  cfg = dict(num_users=20, per_user=10, cohort=10, batch=5, eval_every=5, num_test=200, image=IMAGE)
  out = pc.run(10, cfg, log=lambda m: None)
  assert out['rounds'] == 10 and len(out['history']) == 2
  assert out['final_accuracy'] > 0.3   # chance is 0.1; the synthetic classes are learnable
  assert out['eval_batch'] in pc.EVAL_BATCHES and out['eval_batch'] <= 200   # measured among those that fit


def test_dropout_draws_bytes_exactly_and_falls_back():
  """Rates whose keep probability is a multiple of 1/256 compare one random byte per unit: kept units are
  scaled by 1/keep, the rest are 0, and the kept fraction is the keep probability; other rates use bernoulli."""
  x = jnp.ones((1000, 1000))   # the kept fraction to 0.002 (about 5 sd; a threshold off by one byte is 0.004)
  for rate, keep_fn in ((0.25, 'bytes'), (0.5, 'bytes'), (0.3, 'bernoulli')):
    out = np.asarray(jax.jit(pc.dropout, static_argnums=1)(x, rate, jax.random.key(7, impl='rbg')))
    keep = 1.0 - rate
    assert np.all((out == 0) | np.isclose(out, 1 / keep)), (rate, keep_fn)
    assert abs((out > 0).mean() - keep) < 0.002, (rate, keep_fn, (out > 0).mean())
  a = pc.dropout(x, 0.25, jax.random.key(1))
  assert not np.array_equal(np.asarray(a), np.asarray(pc.dropout(x, 0.25, jax.random.key(2))))
  # odd sizes (not a multiple of 4 bytes) keep their shape
  assert pc.dropout(jnp.ones((3, 5)), 0.5, jax.random.key(0)).shape == (3, 5)


def test_run_rejects_a_device_count_that_does_not_divide_the_cohort():
  with pytest.raises(ValueError, match='divisor of the cohort'):
    pc.run(1, dict(num_users=20, per_user=10, cohort=10, image=IMAGE), devices=3)


def test_the_running_sum_excludes_a_non_finite_client_like_the_stacked_mean(population):
  """chunk 1 adds the clients' weighted parameters as they finish (cohort_sum); a client whose update is NaN
  is left out (`excluded`) and the mean of the others is the stacked path's (MMA mean), to float rounding."""
  x = np.array(population.x)
  x[2] = np.nan
  bad = population._replace(x=x)
  params = pc.init_cnn(jax.random.key(0), IMAGE)
  out = {}
  for chunk in (0, 1):
    algo = pc.make_fedavg(dict(pc.CONFIG, batch=4), chunk=chunk)
    out[chunk] = jax.jit(algo.apply)(algo.init(params), bad, jax.random.key(5))
  assert int(out[0][1]['excluded']) == int(out[1][1]['excluded']) == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out[1][0].params))
  _close(out[1][0].params, out[0][0].params, 'running sum vs stacked mean with a NaN client')
  sums, rest = cohort_map.cohort_sum(lambda a, b: ((a * b, a), a + b), 1)(jnp.arange(4.0), 2.0)
  assert float(sums[0]) == 12.0 and float(sums[1]) == 6.0 and rest.tolist() == [2.0, 3.0, 4.0, 5.0]
