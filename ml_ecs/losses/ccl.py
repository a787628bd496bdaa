"""CCL, cross-modal contrastive learning: align a node's modality embeddings in one latent space.

`method.ccl` picks the loss: 'gram' (GRAM volume loss, Cicchetti et al., ICLR 2025),
'infonce' (pairwise CLIP-style InfoNCE) or 'none'; weight `method.lambda_ccl`,
temperature `method.tau_ccl`. Missing modalities are masked out, never zero-filled.
`method.ccl_anchor` picks GRAM's anchor: 'text' (faithful default, as in GRAM: the
embedding of the sample's answer text, i.e. the mean of the frozen backbone's token
embeddings of the answer through a trainable text projection, `MultimodalLM.text_embedding`;
present for labelled samples only; a training loss only, so nothing leaks into evaluation)
or 'modality' (the node's first modality, the original). Positives are by sample id:
other rows of the batch with the same sample id (duplicates: batches are drawn with
replacement) or the same sequence id (windows of one recording) are excluded from the
negatives (`exclude`), in both losses. With the text anchor (`NodeProgram.ccl_term`) two
labelled rows of the same class are excluded from each other's negatives too (the anchor is a
class text: a same-class sample is not a negative of it), and the unlabelled rows, which have no
text, join through a second, modality-to-modality term (GRAM anchored on the node's first
modality, over the unlabelled rows); the two terms are averaged weighted by their anchors.
Metric names: client/private_ccl, server/ccl; client/private_ccl_anchors, server/ccl_anchors
(rows per batch that anchor a positive pair, text and modality terms together; `ccl_anchors`).
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

# Stands in for excluded logits: far below any real logit, yet finite (no NaN from inf - inf).
NEG_LOGIT = -1e9
# Smallest Cholesky pivot; keeps degenerate (rank-deficient) Grams finite, value and gradient.
_PIVOT_FLOOR = 1e-12
_NORM_EPS = 1e-12


def l2_normalize(x: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
  """Unit-norm vectors along the last axis; masked-out vectors (mask == 0) become zero."""
  x = jnp.asarray(x)
  if mask is not None:
    x = jnp.where(jnp.asarray(mask).astype(bool)[..., None], x, 0)
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS))


def masked_soft_ce(logits: jax.Array, valid: jax.Array, probs: jax.Array, axis: int) -> jax.Array:
  """Cross-entropy of softmax(logits) against target probs along axis, over valid entries only."""
  masked = jnp.where(valid, logits, NEG_LOGIT)
  lse = jax.nn.logsumexp(masked, axis=axis)
  return lse - jnp.sum(jnp.where(valid, probs * logits, 0), axis=axis)


def _cholesky_diag(gram: jax.Array) -> jax.Array:
  """Diagonal of the Cholesky factor of [..., K, K] PSD matrices, pivots floored at _PIVOT_FLOOR."""
  k = gram.shape[-1]
  idx = jnp.arange(k)
  cols: list[jax.Array] = []  # cols[c] = L[..., :, c], zero on and above the diagonal
  diag: list[jax.Array] = []
  for j in range(k):
    pivot = gram[..., j, j]
    off = gram[..., :, j]
    for c in cols:
      pivot = pivot - jnp.square(c[..., j])
      off = off - c * c[..., j:j + 1]
    ljj = jnp.sqrt(jnp.maximum(pivot, _PIVOT_FLOOR))
    diag.append(ljj)
    cols.append(jnp.where(idx > j, off / ljj[..., None], 0))
  return jnp.stack(diag, axis=-1)


def volume_from_gram(gram: ArrayLike, mask: ArrayLike) -> jax.Array:
  """sqrt(det) of the sub-Gram [..., K, K] of present entries (mask [..., K]); 1 if none present."""
  gram = jnp.asarray(gram)
  m = jnp.asarray(mask).astype(bool)
  both = m[..., :, None] & m[..., None, :]
  eye = jnp.eye(gram.shape[-1], dtype=bool)
  gram = jnp.where(both, gram, jnp.where(eye, 1, 0).astype(gram.dtype))
  return jnp.prod(_cholesky_diag(gram), axis=-1)


def gram_volume(vectors: ArrayLike, mask: ArrayLike) -> jax.Array:
  """Volume of the parallelotope spanned by the present, L2-normalised vectors.

  Args:
    vectors: [..., K, D].
    mask: [..., K]; nonzero marks present vectors.

  Returns:
    [...] sqrt(det(A^T A)) with A the present unit vectors as columns (1 if none present).
  """
  v = l2_normalize(vectors, mask)
  return volume_from_gram(jnp.einsum('...kd,...ld->...kl', v, v), mask)


def _drop_false_negatives(valid: jax.Array, exclude: ArrayLike | None) -> jax.Array:
  """valid [..., B, B] without the off-diagonal pairs marked in exclude [B, B]."""
  if exclude is None:
    return valid
  ex = jnp.asarray(exclude).astype(bool) & ~jnp.eye(valid.shape[-1], dtype=bool)
  return valid & ~ex


def gram_contrastive_loss(emb: ArrayLike, mask: ArrayLike, anchor: int, tau: ArrayLike,
                          batch_mask: ArrayLike | None = None, exclude: ArrayLike | None = None) -> jax.Array:
  """GRAM symmetric contrastive loss (Cicchetti et al., ICLR 2025) with missing modalities.

  logits[i, j] = -Vol(anchor of i, present non-anchor modalities of j) / tau; the positive
  of row i / column j is the diagonal. Pair (i, j) is valid iff i's anchor is present and
  j has a present non-anchor modality; rows/columns with an invalid diagonal are dropped.

  Args:
    emb: [B, K, D] per-modality embeddings.
    mask: [B, K]; nonzero marks present modalities.
    anchor: static index of the anchor modality (e.g. text).
    tau: temperature.
    batch_mask: optional [B]; zero marks padding samples (all modalities missing).
    exclude: optional [B, B] bool; off-diagonal True pairs are not negatives (false negatives).

  Returns:
    Scalar 0.5 * (row CE + column CE) averaged over valid diagonals; 0 if none.
  """
  emb = jnp.asarray(emb)
  b, k, _ = emb.shape
  if not 0 <= anchor < k:
    raise ValueError(f'anchor {anchor} out of range for {k} modalities')
  m = jnp.asarray(mask).astype(bool)
  if batch_mask is not None:
    m = m & jnp.asarray(batch_mask).astype(bool)[:, None]
  e = l2_normalize(emb, m)
  is_a = np.arange(k) == anchor
  a = e[:, anchor]                                   # [B, D]
  g_self = jnp.einsum('bkd,bld->bkl', e, e)          # [B, K, K]  Gram of sample j
  cross = jnp.einsum('id,jkd->ijk', a, e)            # [B, B, K]  <anchor_i, mod_k of j>
  a_sq = jnp.sum(jnp.square(a), axis=-1)             # [B]
  gram = jnp.where(is_a[:, None], cross[:, :, None, :], g_self[None])
  gram = jnp.where(is_a[None, :], cross[:, :, :, None], gram)
  gram = jnp.where(is_a[:, None] & is_a[None, :], a_sq[:, None, None, None], gram)  # [B,B,K,K]
  pair_mask = jnp.where(is_a, m[:, None, anchor:anchor + 1], m[None, :, :])          # [B,B,K]
  vol = volume_from_gram(gram, pair_mask)            # [B, B]

  has_anchor = m[:, anchor]
  has_other = jnp.any(m & ~is_a, axis=-1)
  valid = _drop_false_negatives(has_anchor[:, None] & has_other[None, :], exclude)
  logits = -vol / tau
  eye = jnp.eye(b, dtype=logits.dtype)
  diag_ok = jnp.diagonal(valid)
  rows = masked_soft_ce(logits, valid, eye, axis=1)
  cols = masked_soft_ce(logits, valid, eye, axis=0)
  total = jnp.sum(jnp.where(diag_ok, rows + cols, 0))
  return 0.5 * total / jnp.maximum(jnp.sum(diag_ok), 1).astype(total.dtype)


def pairwise_infonce_loss(emb: ArrayLike, mask: ArrayLike, tau: ArrayLike,
                          exclude: ArrayLike | None = None) -> jax.Array:
  """CLIP-style symmetric InfoNCE averaged over modality pairs k < l.

  Each pair uses only samples with both modalities present; pairs with fewer than 2 such
  samples are left out of the average.

  Args:
    emb: [B, K, D] per-modality embeddings.
    mask: [B, K]; nonzero marks present modalities.
    tau: temperature; logits are cosine / tau.
    exclude: optional [B, B] bool; off-diagonal True pairs are not negatives.

  Returns:
    Scalar mean over usable pairs of 0.5 * (row CE + column CE); 0 if no pair is usable.
  """
  emb = jnp.asarray(emb)
  b, k, _ = emb.shape
  pairs = list(itertools.combinations(range(k), 2))
  if not pairs:
    return jnp.zeros((), emb.dtype)
  ks, ls = (np.array(p) for p in zip(*pairs))
  m = jnp.asarray(mask).astype(bool)
  e = l2_normalize(emb, m)
  logits = jnp.einsum('ipd,jpd->pij', e[:, ks], e[:, ls]) / tau   # [P, B, B]
  ok = m[:, ks] & m[:, ls]                                         # [B, P]
  ok = ok.T                                                        # [P, B]
  valid = _drop_false_negatives(ok[:, :, None] & ok[:, None, :], exclude)
  eye = jnp.eye(b, dtype=logits.dtype)
  rows = masked_soft_ce(logits, valid, eye, axis=2)                # [P, B]
  cols = masked_soft_ce(logits, valid, eye, axis=1)                # [P, B]
  count = jnp.sum(ok, axis=1)
  per_pair = 0.5 * jnp.sum(jnp.where(ok, rows + cols, 0), axis=1) / jnp.maximum(count, 1)
  usable = count >= 2
  total = jnp.sum(jnp.where(usable, per_pair, 0))
  return total / jnp.maximum(jnp.sum(usable), 1).astype(total.dtype)


CCL_KINDS = ('gram', 'infonce', 'none')
CCL_ANCHORS = ('text', 'modality')


def ccl_anchors(kind: str, mask: jax.Array) -> jax.Array:
  """How many rows of a batch of views (mask [B, K]) take part in the configured CCL loss as a
  positive pair: GRAM's valid diagonals (view 0 present and another view present), for InfoNCE the
  rows with >= 2 views present; 0 for < 2 views or kind 'none' (float32 scalar)."""
  m = jnp.asarray(mask).astype(bool)
  if kind == 'none' or m.shape[1] < 2:
    return jnp.zeros((), jnp.float32)
  rows = m[:, 0] & jnp.any(m[:, 1:], axis=1) if kind == 'gram' else jnp.sum(m, axis=1) >= 2
  return jnp.sum(rows).astype(jnp.float32)


def ccl_loss(kind: str, projected: jax.Array, mask: jax.Array, tau: float,
             exclude: jax.Array | None = None) -> jax.Array:
  """The configured CCL loss of a batch of views [B, K, D] (0 for < 2 views); GRAM anchors
  on view 0 (the text embedding with the text anchor); `exclude` as in the losses."""
  if kind == 'none' or projected.shape[1] < 2:
    return jnp.zeros((), projected.dtype)
  if kind == 'gram':
    return gram_contrastive_loss(projected, mask, 0, tau, exclude=exclude)
  if kind == 'infonce':
    return pairwise_infonce_loss(projected, mask, tau, exclude=exclude)
  raise ValueError(f'method.ccl must be one of {CCL_KINDS}, got {kind!r}')
