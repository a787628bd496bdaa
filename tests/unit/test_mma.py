"""MMA and SE-CCL target aggregation against NumPy, communication accounting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from ml_ecs.aggregation import mean
from ml_ecs.core import communication
from ml_ecs.algorithms.ml_ecs import mma, se_ccl
from ml_ecs.models.variables import ModalityLoRA, SharedLoRA

MODS = ('accel', 'depth', 'image')


class _Shared(nnx.Module):
  """A shared part like a node's: a backbone LoRA leaf and one modality adapter leaf per modality."""

  def __init__(self, w, adapters):
    self.backbone = nnx.Dict({'w': SharedLoRA(w)})
    self.adapters = nnx.Dict({m: nnx.Dict({'a': ModalityLoRA(a, modality=m)}) for m, a in adapters.items()})


def _tree(rng, c):
  """Stacked shared state of c clients, as an nnx State with ModalityLoRA-typed adapter leaves."""
  module = _Shared(jnp.asarray(rng.normal(size=(c, 3, 2)), jnp.float32),
                   {m: jnp.asarray(rng.normal(size=(c, 4)), jnp.float32) for m in MODS})
  return nnx.split(module)[1]


def test_leaf_modalities_by_variable_type_not_path():
  class Odd(nnx.Module):   # an adapter under an unrelated path, and a shared leaf under 'adapters'
    def __init__(self):
      self.anything = ModalityLoRA(jnp.ones(2), modality='image')
      self.adapters = SharedLoRA(jnp.ones(3))
  leaf_mod = mma.leaf_modalities(nnx.split(Odd())[1], MODS)
  assert leaf_mod['anything'] == 2 and leaf_mod['adapters'] == -1


@pytest.mark.parametrize('modality_aware', [True, False])
def test_aggregate_matches_numpy(modality_aware):
  rng = np.random.default_rng(0)
  cohorts = [_tree(rng, 2), _tree(rng, 3)]
  weights = [jnp.array([1.0, 2.0]), jnp.array([3.0, 0.5, 1.5])]
  presence = [jnp.array([[1, 1, 0], [1, 1, 0]], jnp.float32), jnp.array([[0, 1, 1], [0, 1, 1], [0, 1, 1]], jnp.float32)]
  prev = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), cohorts[0])
  leaf_mod = mma.leaf_modalities(prev, MODS)
  assert leaf_mod['backbone']['w'] == -1 and leaf_mod['adapters']['image']['a'] == 2
  # aggregate takes the modality leaves' weights directly ([C, M]); the 'client' rule is weight x presence.
  mod_w = [wt[:, None] * p for wt, p in zip(weights, presence)]
  out, excluded = mean.modality_mean(cohorts, weights, mod_w, prev, leaf_mod, modality_aware)
  assert int(excluded) == 0
  w = np.concatenate([np.asarray(x) for x in weights])
  pres = np.concatenate([np.asarray(p) for p in presence])
  cat = lambda f: np.concatenate([np.asarray(f(t)) for t in cohorts])
  ref_w = np.tensordot(w, cat(lambda t: t['backbone']['w']), 1) / w.sum()
  np.testing.assert_allclose(out['backbone']['w'], ref_w, rtol=1e-5)
  for k, m in enumerate(MODS):
    wm = w * pres[:, k] if modality_aware else w
    ref = np.tensordot(wm, cat(lambda t: t['adapters'][m]['a']), 1) / wm.sum()
    np.testing.assert_allclose(out['adapters'][m]['a'], ref, rtol=1e-5)


def test_aggregate_excludes_nan_clients_and_keeps_orphan_leaves():
  rng = np.random.default_rng(1)
  t = _tree(rng, 3)
  t['backbone']['w'] = t['backbone']['w'].at[1, 0, 0].set(jnp.nan)
  presence = jnp.array([[1, 0, 0], [1, 0, 0], [1, 0, 0]], jnp.float32)   # nobody has image/depth
  prev = jax.tree.map(lambda x: jnp.full(x.shape[1:], 7.0), t)
  leaf_mod = mma.leaf_modalities(prev, MODS)
  out, excluded = mean.modality_mean([t], [jnp.array([1.0, 1.0, 2.0])], [presence], prev, leaf_mod, True)
  assert int(excluded) == 1
  ref = (np.asarray(t['backbone']['w'][0]) + 2 * np.asarray(t['backbone']['w'][2])) / 3
  np.testing.assert_allclose(out['backbone']['w'], ref, rtol=1e-5)
  assert bool(jnp.isfinite(out['backbone']['w']).all())
  np.testing.assert_array_equal(out['adapters']['image']['a'], 7.0)   # no contributor: previous value


def test_client_weights():
  n, k = np.array([10, 20]), np.array([3, 1])
  np.testing.assert_array_equal(mma.client_weights('samples', n, k), [10, 20])
  np.testing.assert_array_equal(mma.client_weights('modality', n, k), [3, 1])
  np.testing.assert_array_equal(mma.client_weights('modality_samples', n, k), [30, 20])
  with pytest.raises(ValueError, match='method.mma_backbone'):
    mma.client_weights('median', n, k)


def test_se_ccl_targets_match_numpy():
  rng = np.random.default_rng(2)
  z = [jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32), jnp.asarray(rng.normal(size=(1, 4, 3)), jnp.float32)]
  ids = [jnp.array([[0, 1, 2, 0], [2, 3, 4, 0]]), jnp.array([[1, 2, 5, 0]])]
  valid = [jnp.array([[1, 1, 1, 0], [1, 1, 1, 0]], jnp.float32), jnp.array([[1, 1, 0, 0]], jnp.float32)]
  w = [jnp.array([1.0, 3.0]), jnp.array([2.0])]
  tgt, has = se_ccl.se_ccl_targets(z, ids, valid, w, 7)
  num, den = np.zeros((7, 3)), np.zeros(7)
  for zk, ik, vk, wk in zip(z, ids, valid, w):
    for c in range(zk.shape[0]):
      for j in range(zk.shape[1]):
        if vk[c, j]:
          num[int(ik[c, j])] += float(wk[c]) * np.asarray(zk[c, j])
          den[int(ik[c, j])] += float(wk[c])
  np.testing.assert_array_equal(np.asarray(has), den > 0)
  np.testing.assert_allclose(np.asarray(tgt)[den > 0], num[den > 0] / den[den > 0, None], rtol=1e-5)


def test_round_bytes():
  shared, reps = np.array([100, 80, 60]), np.array([10, 20, 30])
  out = communication.round_bytes(shared, reps, np.array([0, 2]), True, True)
  assert out['comm/bytes_up'] == 200 and out['comm/lora_bytes_up'] == 160 and out['comm/reps_bytes_down'] == 40
  assert communication.round_bytes(shared, reps, np.array([0, 2]), False, False)['comm/bytes_up'] == 0
