"""Losses against independent float64 NumPy references, plus masking, gradients and jit/vmap."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ml_ecs.losses.ccl import gram_contrastive_loss, gram_volume, pairwise_infonce_loss
from ml_ecs.losses.lm import lm_loss, token_accuracy
from ml_ecs.losses.se_ccl import se_ccl_loss

RTOL = 1e-5
SEEDS = range(4)

# Jitted once at module level: eager op-by-op dispatch would dominate the test time.
LM = jax.jit(lm_loss)
ACC = jax.jit(token_accuracy)
VOL = jax.jit(gram_volume)
GRAM = jax.jit(gram_contrastive_loss, static_argnums=2)
PAIR = jax.jit(pairwise_infonce_loss)
ALIGN = jax.jit(se_ccl_loss, static_argnames='symmetric')


def assert_rel(actual, expected, rtol: float = RTOL, atol: float = 1e-7):
  """|actual - expected| <= rtol * |expected| + atol elementwise (atol only matters at 0)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  err = np.abs(actual - expected)
  bound = rtol * np.abs(expected) + atol
  rel = np.max(err / np.maximum(np.abs(expected), 1e-30))
  assert np.all(err <= bound), f'max rel err {rel:.3g}'


def f32(x):
  return np.asarray(x, np.float32)


def random_mask(rng, shape, p_present=0.7, full_missing_rows=1):
  """Random bool mask with some rows entirely missing."""
  m = rng.random(shape) < p_present
  for r in rng.choice(shape[0], size=min(full_missing_rows, shape[0]), replace=False):
    m[r] = False
  return m


# ---------------------------------------------------------------- NumPy references (float64)

def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  mx = np.max(x)
  return x - mx - np.log(np.sum(np.exp(x - mx)))


def np_unit(v):
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v)


def ref_volume(vectors, present):
  """sqrt(det(A^T A)) for the present unit vectors (columns of A); 1 for none."""
  cols = [np_unit(v) for v, p in zip(vectors, present) if p]
  if not cols:
    return 1.0
  a = np.stack(cols, axis=1)
  return float(np.sqrt(max(np.linalg.det(a.T @ a), 0.0)))


def ref_lm(logits, targets, mask):
  total, count, hits = 0.0, 0, 0
  b, t, _ = logits.shape
  for i in range(b):
    for s in range(t):
      if mask[i, s]:
        total -= np_log_softmax(logits[i, s])[targets[i, s]]
        hits += int(np.argmax(logits[i, s]) == targets[i, s])
        count += 1
  return total / max(count, 1), hits / max(count, 1)


def ref_gram(emb, mask, anchor, tau, batch_mask=None):
  b, k, _ = emb.shape
  mask = mask.astype(bool).copy()
  if batch_mask is not None:
    mask &= batch_mask.astype(bool)[:, None]
  others = [c for c in range(k) if c != anchor]
  has_anchor = mask[:, anchor]
  has_other = np.array([any(mask[j, c] for c in others) for j in range(b)])
  valid = np.zeros((b, b), bool)
  logits = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      valid[i, j] = has_anchor[i] and has_other[j]
      if valid[i, j]:
        vecs = [emb[i, anchor]] + [emb[j, c] for c in others if mask[j, c]]
        logits[i, j] = -ref_volume(vecs, [True] * len(vecs)) / tau
  total, count = 0.0, 0
  for i in range(b):
    if not valid[i, i]:
      continue
    row = [j for j in range(b) if valid[i, j]]
    col = [j for j in range(b) if valid[j, i]]
    total -= np_log_softmax(logits[i, row])[row.index(i)]
    total -= np_log_softmax(logits[col, i])[col.index(i)]
    count += 1
  return 0.5 * total / count if count else 0.0


def ref_pairwise(emb, mask, tau):
  b, k, _ = emb.shape
  per_pair = []
  for p in range(k):
    for q in range(p + 1, k):
      idx = [i for i in range(b) if mask[i, p] and mask[i, q]]
      if len(idx) < 2:
        continue
      s = np.array([[np_unit(emb[i, p]) @ np_unit(emb[j, q]) for j in idx] for i in idx]) / tau
      n = len(idx)
      rows = -sum(np_log_softmax(s[a])[a] for a in range(n)) / n
      cols = -sum(np_log_softmax(s[:, a])[a] for a in range(n)) / n
      per_pair.append(0.5 * (rows + cols))
  return float(np.mean(per_pair)) if per_pair else 0.0


def ref_alignment(z, t, z_ids, t_ids, zm, tm, tau, symmetric):
  zi = [i for i in range(len(z)) if zm[i]]
  tj = [j for j in range(len(t)) if tm[j]]
  s = np.array([[np_unit(z[i]) @ np_unit(t[j]) for j in tj] for i in zi]).reshape(len(zi), len(tj))
  s = s / tau
  pos = np.array([[z_ids[i] == t_ids[j] for j in tj] for i in zi], float).reshape(s.shape)

  def one_way(logits, positives):
    losses = []
    for r in range(logits.shape[0]):
      if positives[r].sum() == 0:
        continue
      p = positives[r] / positives[r].sum()
      losses.append(-np.sum(p * np_log_softmax(logits[r])))
    return float(np.mean(losses)) if losses else 0.0

  forward = one_way(s, pos)
  return 0.5 * (forward + one_way(s.T, pos.T)) if symmetric else forward


# ---------------------------------------------------------------- random inputs

def gram_case(seed, b=None, k=None, d=None):
  rng = np.random.default_rng(seed)
  b = b or int(rng.integers(3, 9))
  k = k or int(rng.integers(2, 5))
  d = d or int(rng.integers(k + 4, 16))
  emb = rng.normal(size=(b, k, d))
  mask = random_mask(rng, (b, k), p_present=0.7, full_missing_rows=1)
  anchor = int(rng.integers(0, k))
  tau = float(rng.uniform(0.05, 0.5))
  return rng, emb, mask, anchor, tau


def align_case(seed):
  rng = np.random.default_rng(100 + seed)
  b, m, d = int(rng.integers(4, 10)), int(rng.integers(4, 12)), int(rng.integers(3, 12))
  z, t = rng.normal(size=(b, d)), rng.normal(size=(m, d))
  ids_pool = int(rng.integers(2, 6))          # small pool -> repeated ids on both sides
  z_ids = rng.integers(0, ids_pool, size=b)
  t_ids = rng.integers(0, ids_pool + 2, size=m)  # some targets without any matching z
  zm, tm = rng.random(b) < 0.75, rng.random(m) < 0.75
  zm[0], tm[0] = True, True
  z_ids[0], t_ids[0] = 99, 99                 # at least one valid positive pair
  tau = float(rng.uniform(0.05, 0.5))
  return rng, z, t, z_ids, t_ids, zm, tm, tau


# ---------------------------------------------------------------- lm

@pytest.mark.parametrize('seed', SEEDS)
def test_lm_matches_reference(seed):
  rng = np.random.default_rng(seed)
  b, t, v = int(rng.integers(1, 5)), int(rng.integers(1, 9)), int(rng.integers(2, 40))
  logits = rng.normal(size=(b, t, v)) * 3
  targets = rng.integers(0, v, size=(b, t))
  mask = random_mask(rng, (b, t), 0.6, full_missing_rows=1 if b > 1 else 0)
  loss_ref, acc_ref = ref_lm(logits, targets, mask)
  assert_rel(LM(f32(logits), targets, mask.astype(np.float32)), loss_ref)
  assert_rel(ACC(f32(logits), targets, mask), acc_ref)


def test_lm_masking_and_empty():
  rng = np.random.default_rng(7)
  logits = f32(rng.normal(size=(3, 6, 11)))
  targets = rng.integers(0, 11, size=(3, 6))
  mask = random_mask(rng, (3, 6), 0.5)
  logits2, targets2 = logits.copy(), targets.copy()
  logits2[~mask] = f32(rng.normal(size=logits2[~mask].shape) * 100)
  targets2[~mask] = -1                        # padding ids out of range must not matter
  np.testing.assert_array_equal(LM(logits, targets, mask), LM(logits2, targets2, mask))
  np.testing.assert_array_equal(ACC(logits, targets, mask),
                                ACC(logits2, targets2, mask))
  assert float(LM(logits, targets, np.zeros_like(mask))) == 0.0
  g = jax.jit(jax.grad(lm_loss))(logits, targets, mask)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~mask] == 0)


def test_lm_jit_vmap():
  rng = np.random.default_rng(8)
  logits = f32(rng.normal(size=(3, 2, 5, 7)))
  targets = rng.integers(0, 7, size=(3, 2, 5))
  mask = rng.random((3, 2, 5)) < 0.6
  batched = jax.jit(jax.vmap(lm_loss))(logits, targets, mask)
  singles = [LM(logits[n], targets[n], mask[n]) for n in range(3)]
  assert_rel(batched, singles)


# ---------------------------------------------------------------- gram volume

@pytest.mark.parametrize('seed', SEEDS)
def test_gram_volume_matches_reference(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(1, 6))
  d = int(rng.integers(k + 3, 16))
  vecs = rng.normal(size=(3, 4, k, d))
  mask = rng.random((3, 4, k)) < 0.7
  mask[0, 0] = False                          # nothing present -> volume 1
  expected = np.array([[ref_volume(vecs[a, c], mask[a, c]) for c in range(4)] for a in range(3)])
  assert_rel(VOL(f32(vecs), mask), expected)


def test_gram_volume_known_values_and_masking():
  e = np.eye(4, dtype=np.float32)
  assert_rel(VOL(e * 3, np.ones(4, bool)), 1.0)
  v = f32([[1, 0, 0], [1, 1, 0], [5, 5, 5]])
  assert_rel(VOL(v, np.array([1, 1, 0])), np.sqrt(0.5))
  v2 = v.copy()
  v2[2] = [-7, 2, 100]
  np.testing.assert_array_equal(VOL(v, np.array([1, 1, 0])),
                                VOL(v2, np.array([1, 1, 0])))


def test_gram_volume_degenerate_is_finite():
  rng = np.random.default_rng(3)
  v = f32(rng.normal(size=(5, 3)))
  v[1] = v[0] * 2                             # duplicate direction; also K > D
  mask = np.ones(5, bool)
  vol, g = jax.jit(jax.value_and_grad(lambda x: gram_volume(x, mask)))(v)
  assert np.isfinite(vol) and abs(float(vol)) < 1e-3
  assert np.all(np.isfinite(g))


# ---------------------------------------------------------------- GRAM loss

@pytest.mark.parametrize('seed', SEEDS)
def test_gram_loss_matches_reference(seed):
  rng, emb, mask, anchor, tau = gram_case(seed)
  bm = rng.random(len(emb)) < 0.85
  assert_rel(GRAM(f32(emb), mask, anchor, tau),
             ref_gram(emb, mask, anchor, tau))
  assert_rel(GRAM(f32(emb), mask, anchor, tau, batch_mask=bm),
             ref_gram(emb, mask, anchor, tau, batch_mask=bm))


def test_gram_loss_masking_grad_empty():
  rng, emb, mask, anchor, tau = gram_case(11, b=6, k=3, d=8)
  mask[:, anchor] = True
  mask[2, anchor] = False                     # row 2 loses its anchor
  bm = np.ones(6, bool)
  bm[4] = False                               # padding sample
  emb2 = emb.copy()
  emb2[~mask] = rng.normal(size=emb2[~mask].shape) * 50
  emb2[4] = rng.normal(size=emb2[4].shape) * 50
  l1 = GRAM(f32(emb), mask, anchor, tau, bm)
  np.testing.assert_array_equal(l1, GRAM(f32(emb2), mask, anchor, tau, bm))
  assert_rel(l1, ref_gram(emb, mask, anchor, tau, batch_mask=bm))

  grad_fn = jax.jit(jax.grad(gram_contrastive_loss, argnums=(0, 3)), static_argnums=2)
  g_emb, g_tau = grad_fn(f32(emb), mask, anchor, jnp.float32(tau), bm)
  assert np.all(np.isfinite(g_emb)) and np.isfinite(g_tau)
  assert np.all(np.asarray(g_emb)[~mask] == 0) and np.all(np.asarray(g_emb)[4] == 0)

  no_anchor = mask.copy()
  no_anchor[:, anchor] = False
  assert float(GRAM(f32(emb), no_anchor, anchor, tau, bm)) == 0.0
  assert float(GRAM(f32(emb), mask, anchor, tau, np.zeros(6, bool))) == 0.0
  g0, _ = grad_fn(f32(emb), no_anchor, anchor, jnp.float32(tau), np.ones(6, bool))
  assert np.all(np.asarray(g0) == 0)


def test_gram_loss_identical_embeddings_finite_grad():
  emb = np.ones((4, 3, 5), np.float32)        # every Gram is singular
  mask = np.ones((4, 3), bool)
  loss, g = jax.jit(jax.value_and_grad(gram_contrastive_loss), static_argnums=2)(emb, mask, 0, 0.1)
  assert np.isfinite(loss) and np.all(np.isfinite(g))


def test_gram_loss_jit_vmap():
  rng = np.random.default_rng(5)
  emb = f32(rng.normal(size=(3, 5, 3, 7)))
  mask = rng.random((3, 5, 3)) < 0.7
  taus = f32([0.1, 0.2, 0.3])
  f = jax.jit(jax.vmap(functools.partial(gram_contrastive_loss, anchor=1)))
  batched = f(emb, mask, tau=taus)
  assert_rel(batched, [ref_gram(emb[n].astype(np.float64), mask[n], 1, float(taus[n]))
                       for n in range(3)])


# ---------------------------------------------------------------- pairwise InfoNCE

@pytest.mark.parametrize('seed', SEEDS)
def test_pairwise_matches_reference(seed):
  rng, emb, mask, _, tau = gram_case(50 + seed)
  assert_rel(PAIR(f32(emb), mask, tau), ref_pairwise(emb, mask, tau))


def test_pairwise_masking_grad_empty():
  rng, emb, mask, _, tau = gram_case(21, b=6, k=4, d=6)
  mask[:, 3] = False
  mask[0, 3] = True                           # every pair with modality 3 has < 2 samples
  emb2 = emb.copy()
  emb2[~mask] = rng.normal(size=emb2[~mask].shape) * 50
  l1 = PAIR(f32(emb), mask, tau)
  np.testing.assert_array_equal(l1, PAIR(f32(emb2), mask, tau))
  assert_rel(l1, ref_pairwise(emb, mask, tau))
  g = jax.jit(jax.grad(pairwise_infonce_loss))(f32(emb), mask, tau)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~mask] == 0)
  assert float(PAIR(f32(emb), np.eye(6, 4, dtype=bool), tau)) == 0.0
  assert float(PAIR(f32(emb[:, :1]), mask[:, :1], tau)) == 0.0


def test_pairwise_jit_vmap():
  rng = np.random.default_rng(6)
  emb = f32(rng.normal(size=(2, 5, 3, 4)))
  mask = rng.random((2, 5, 3)) < 0.7
  batched = jax.jit(jax.vmap(pairwise_infonce_loss, in_axes=(0, 0, None)))(emb, mask, 0.2)
  assert_rel(batched, [ref_pairwise(emb[n], mask[n], 0.2) for n in range(2)])


# ---------------------------------------------------------------- alignment

@pytest.mark.parametrize('symmetric', [True, False])
@pytest.mark.parametrize('seed', SEEDS)
def test_alignment_matches_reference(seed, symmetric):
  _, z, t, z_ids, t_ids, zm, tm, tau = align_case(seed)
  got = ALIGN(f32(z), f32(t), z_ids, t_ids, zm, tm, tau, symmetric=symmetric)
  assert_rel(got, ref_alignment(z, t, z_ids, t_ids, zm, tm, tau, symmetric))


def test_alignment_masking_grad_empty():
  rng, z, t, z_ids, t_ids, zm, tm, tau = align_case(9)
  zm[1], tm[1] = False, False
  z2, t2, z_ids2, t_ids2 = z.copy(), t.copy(), z_ids.copy(), t_ids.copy()
  z2[~zm] = rng.normal(size=z2[~zm].shape) * 50
  t2[~tm] = rng.normal(size=t2[~tm].shape) * 50
  z_ids2[~zm] = 99                            # would create positives if it were not masked
  t_ids2[~tm] = 99
  l1 = ALIGN(f32(z), f32(t), z_ids, t_ids, zm, tm, tau)
  np.testing.assert_array_equal(l1, ALIGN(f32(z2), f32(t2), z_ids2, t_ids2, zm, tm, tau))
  grad_fn = jax.jit(jax.grad(se_ccl_loss, argnums=(0, 1)), static_argnames='symmetric')
  gz, gt = grad_fn(f32(z), f32(t), z_ids, t_ids, zm, tm, tau)
  assert np.all(np.isfinite(gz)) and np.all(np.isfinite(gt))
  assert np.all(np.asarray(gz)[~zm] == 0) and np.all(np.asarray(gt)[~tm] == 0)
  disjoint = ALIGN(f32(z), f32(t), np.arange(len(z)), np.arange(len(t)) + 1000, zm, tm, tau)
  assert float(disjoint) == 0.0
  assert float(ALIGN(f32(z), f32(t), z_ids, t_ids, np.zeros_like(zm), tm, tau)) == 0.0


def test_alignment_jit_vmap():
  rng = np.random.default_rng(10)
  z, t = f32(rng.normal(size=(3, 6, 5))), f32(rng.normal(size=(3, 4, 5)))
  z_ids, t_ids = rng.integers(0, 3, size=(3, 6)), rng.integers(0, 3, size=(3, 4))
  zm, tm = rng.random((3, 6)) < 0.8, rng.random((3, 4)) < 0.8
  f = jax.jit(jax.vmap(functools.partial(se_ccl_loss, tau=0.1, symmetric=True)))
  batched = f(z, t, z_ids, t_ids, zm, tm)
  assert_rel(batched, [ref_alignment(z[n], t[n], z_ids[n], t_ids[n], zm[n], tm[n], 0.1, True)
                       for n in range(3)])
