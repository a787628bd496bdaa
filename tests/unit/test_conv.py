"""Convolutions as batched matmuls (ml_ecs/models/conv.py) and their measured choice at setup
(ml_ecs/core/autotune.py, `train.conv_impl`): the same results as XLA's convolution to float rounding."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

from benchmarks.lib import pfl_cifar10 as pc
from ml_ecs.config import validation
from ml_ecs.config.identity import identity
from ml_ecs.core import autotune
from ml_ecs.models.conv import conv_function, matmul_conv
from ml_ecs.models.encoders import make_encoder
from ml_ecs.run import trainer
from studies.compare import grid
from studies.compare.configs import collaborate

CASES = [   # input shape, kernel shape, strides, padding
    ((4, 17, 5), (3, 5, 7), (1,), 'SAME'),
    ((4, 17, 5), (3, 5, 7), (2,), 'SAME'),
    ((4, 16, 5), (4, 5, 6), (3,), 'VALID'),
    ((3, 12, 11, 3), (3, 3, 3, 8), (1, 1), 'VALID'),
    ((3, 12, 11, 3), (3, 2, 3, 8), (2, 1), 'SAME'),
    ((3, 12, 11, 3), (3, 3, 3, 8), (1, 1), ((1, 2), (0, 1))),
]


def _dn(ndim):
  return ('NWC', 'WIO', 'NWC') if ndim == 3 else ('NHWC', 'HWIO', 'NHWC')


@pytest.mark.parametrize('shape,kernel,strides,padding', CASES)
def test_matmul_conv_equals_xla_conv_with_gradients(shape, kernel, strides, padding):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, shape), jax.random.normal(kw, kernel)
  ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_dn(len(shape)))
  new = lambda x, w: matmul_conv(x, w, strides, padding, dimension_numbers=_dn(len(shape)))
  out_ref, out_new = ref(x, w), new(x, w)
  assert out_new.shape == out_ref.shape
  np.testing.assert_allclose(out_new, out_ref, atol=1e-5, rtol=1e-5)
  probe = jax.random.normal(kg, out_ref.shape)   # gradients of a random projection, for the input and the kernel
  g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * probe), (0, 1))(x, w)
  g_new = jax.grad(lambda x, w: jnp.sum(new(x, w) * probe), (0, 1))(x, w)
  for a, b in zip(g_new, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_vmapped_over_per_client_kernels_as_in_a_cohort():
  """Each client its own kernel: the vmapped matmul form equals the vmapped (grouped) XLA convolution."""
  kx, kw = jax.random.split(jax.random.key(1))
  x, w = jax.random.normal(kx, (5, 4, 10, 10, 3)), jax.random.normal(kw, (5, 3, 3, 3, 6))
  per = lambda fn: jax.vmap(lambda x, w: fn(x, w, (1, 1), 'SAME', dimension_numbers=_dn(4)))
  np.testing.assert_allclose(per(matmul_conv)(x, w), per(lax.conv_general_dilated)(x, w), atol=1e-5, rtol=1e-5)


def test_cases_outside_the_matmul_form_are_xlas():
  """Feature groups, dilation or another layout go to lax.conv_general_dilated, unchanged."""
  kx, kw = jax.random.split(jax.random.key(2))
  x, w = jax.random.normal(kx, (2, 9, 4)), jax.random.normal(kw, (3, 2, 6))
  args = dict(dimension_numbers=_dn(3), feature_group_count=2)
  np.testing.assert_array_equal(matmul_conv(x, w, (1,), 'SAME', **args),
                                lax.conv_general_dilated(x, w, (1,), 'SAME', **args))
  w1 = jax.random.normal(kw, (3, 4, 6))
  np.testing.assert_array_equal(matmul_conv(x, w1, (1,), 'SAME', rhs_dilation=(2,), dimension_numbers=_dn(3)),
                                lax.conv_general_dilated(x, w1, (1,), 'SAME', rhs_dilation=(2,),
                                                         dimension_numbers=_dn(3)))
  with pytest.raises(ValueError, match="'winograd'"):
    conv_function('winograd')


def test_conv1d_encoder_has_the_same_parameters_and_outputs_either_way():
  x = jax.random.normal(jax.random.key(3), (6, 32, 3))
  xla, mm = (make_encoder('conv1d', (32, 3), 16, 8, rngs=nnx.Rngs(0), conv_impl=impl) for impl in ('xla', 'matmul'))
  s_xla, s_mm = nnx.state(xla), nnx.state(mm)
  assert jax.tree.structure(s_xla) == jax.tree.structure(s_mm)
  for a, b in zip(jax.tree.leaves(s_xla), jax.tree.leaves(s_mm)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(mm(x), xla(x), atol=1e-5, rtol=1e-5)


def test_a_fedavg_cohort_round_is_the_same_with_either_convolution():
  """pfl's CNN (benchmarks/lib/pfl_cifar10.py), one round of 4 clients with dropout: today's path and the
  matmul form give the same global model to float rounding."""
  image = (8, 8, 3)
  data = pc.synthetic_cifar10(48, 8, image, seed=3)
  users = pc.partition_iid(data['x_train'], data['y_train'], num_users=4, per_user=12, seed=3)
  params = pc.init_cnn(jax.random.key(0), image)
  out = {}
  for impl in ('xla', 'matmul'):
    algo = pc.make_fedavg(dict(pc.CONFIG, batch=4), conv_impl=impl)
    out[impl] = jax.jit(algo.apply)(algo.init(params), users, jax.random.key(5))[0].params
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out['xla']), jax.tree.leaves(params)))
  assert moved > 1e-3
  for a, b in zip(jax.tree.leaves(out['matmul']), jax.tree.leaves(out['xla'])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_fastest_picks_the_quicker_candidate_and_caches_it(tmp_path):
  path = str(tmp_path / 'autotune.json')
  x = jnp.ones((64, 64))
  slow = lambda x: jax.lax.fori_loop(0, 200, lambda i, y: jnp.tanh(y @ x), x)
  fast = lambda x: x + 1.0
  choice, record = autotune.fastest('case-a', {'slow': slow, 'fast': fast}, (x,), path=path)
  assert choice == 'fast' and not record['cached']
  assert record['seconds']['fast'] < record['seconds']['slow']

  def never(x):
    raise AssertionError('a cached case is not measured again')
  choice, record = autotune.fastest('case-a', {'slow': never, 'fast': never}, (x,), path=path)
  assert choice == 'fast' and record['cached']
  stored = json.load(open(path))
  assert [r['choice'] for r in stored.values()] == ['fast']
  open(path, 'w').write('{not json')   # a damaged cache is measured again and rewritten whole
  assert autotune.fastest('case-a', {'fast': fast}, (x,), path=path)[1]['cached'] is False
  assert len(json.load(open(path))) == 1


def test_a_choice_of_older_candidates_code_is_measured_again(tmp_path, monkeypatch):
  path = str(tmp_path / 'autotune.json')
  x = jnp.ones((8, 8))
  assert autotune.fastest('case-b', {'a': lambda x: x + 1}, (x,), path=path)[1]['cached'] is False
  assert autotune.fastest('case-b', {'a': lambda x: x + 1}, (x,), path=path)[1]['cached'] is True
  monkeypatch.setattr(autotune, 'REVISION', autotune.REVISION + 1)
  assert autotune.fastest('case-b', {'a': lambda x: x + 1}, (x,), path=path)[1]['cached'] is False
  assert len(json.load(open(path))) == 2 and all(jax.__version__ in k for k in json.load(open(path)))


def test_conv_impl_setting(tmp_path, monkeypatch):
  shapes = {'accel': (16, 3), 'depth': (12,)}
  path = str(tmp_path / 'autotune.json')
  kw = dict(shapes=shapes, width=8, d_out=8, clients=3, batch=4, path=path)
  assert autotune.conv_impl('matmul', {'accel': 'conv1d'}, **kw) == ('matmul', None)
  assert autotune.conv_impl('xla', {'accel': 'conv1d'}, **kw) == ('xla', None)
  assert autotune.conv_impl('auto', {'depth': 'mlp'}, **kw) == ('xla', None)   # nothing to choose
  impl, record = autotune.conv_impl('auto', {'accel': 'conv1d', 'depth': 'mlp'}, **kw)
  assert impl in ('xla', 'matmul') and impl == min(record['seconds'], key=record['seconds'].get)
  assert set(record['seconds']) == {'xla', 'matmul'} and 'clients=3' in record['case']

  def no_encoders(*args, **kwargs):
    raise AssertionError('a cached choice builds no candidate encoders')
  monkeypatch.setattr(autotune, 'make_encoder', no_encoders)
  again, record = autotune.conv_impl('auto', {'accel': 'conv1d', 'depth': 'mlp'}, **kw)
  assert again == impl and record['cached']
  with pytest.raises(ValueError, match='train.conv_impl'):
    autotune.conv_impl('fast', {'accel': 'conv1d'}, **kw)


def test_conv_impl_is_validated_and_xla_keeps_the_identity_of_older_runs(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  assert cfg.train.conv_impl == 'auto'
  bad = cfg.copy_and_resolve_references()
  bad.train.conv_impl = 'cudnn'
  with pytest.raises(validation.ConfigError, match="train.conv_impl.*'cudnn'"):
    validation.validate(bad)
  saved = trainer.config_dict(cfg)
  del saved['train']['conv_impl']                     # a config.json written before the field existed
  cfg.train.conv_impl = 'xla'
  assert trainer.config_differences(identity(saved), identity(trainer.config_dict(cfg))) == []
  cfg.train.conv_impl = 'auto'
  assert trainer.config_differences(identity(saved), identity(trainer.config_dict(cfg))) == ['train.conv_impl']


def test_the_comparison_grids_keep_xlas_convolution_and_their_cell_names():
  """The grids started before conv_impl existed (collaborate.py on discriminating.py) stay one implementation
  and keep their cell hashes."""
  cfg = collaborate.get_config('pairs_reduced')
  assert cfg.train.conv_impl == 'xla'
  old = cfg.copy_and_resolve_references()
  with old.ignore_type():
    del old.train['conv_impl']
  assert grid.config_hash(old) == grid.config_hash(cfg)


def test_the_cnns_max_pooling_equals_reduce_window_with_its_gradient():
  h = jax.random.normal(jax.random.key(4), (3, 28, 27, 5))   # odd width: the last column is dropped, as VALID
  ref = lambda h: lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
  np.testing.assert_array_equal(pc.max_pool2(h), ref(h))
  probe = jax.random.normal(jax.random.key(5), ref(h).shape)
  np.testing.assert_array_equal(jax.grad(lambda h: jnp.sum(pc.max_pool2(h) * probe))(h),
                                jax.grad(lambda h: jnp.sum(ref(h) * probe))(h))


def test_the_first_stored_choice_stays(tmp_path):
  """Two processes that measured the same case concurrently make the first stored choice (under a lock)."""
  path = str(tmp_path / 'autotune.json')
  first = {'choice': 'xla', 'seconds': {'xla': 1.0, 'matmul': 1.1}, 'case': 'c'}
  second = {'choice': 'matmul', 'seconds': {'xla': 1.2, 'matmul': 1.0}, 'case': 'c'}
  assert autotune._store(path, 'k', first) == first
  assert autotune._store(path, 'k', second) == first
  assert json.load(open(path))['k']['choice'] == 'xla'
