"""CCL with the text anchor (issue 21): same-class labelled rows are no negatives of each other, and
unlabelled rows join through the modality-to-modality term (`NodeProgram.ccl_term`)."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ml_ecs.core.node import NodeProgram
from ml_ecs.data.cohort_data import SplitArrays
from ml_ecs.losses.ccl import ccl_anchors, ccl_loss

D = 4


def _batch(labelled, labels, mod_mask):
  b = len(labels)
  answer_mask = np.zeros((b, 3), np.float32)
  answer_mask[np.asarray(labelled, bool)] = 1.0
  return SplitArrays(inputs={}, mod_mask=jnp.asarray(mod_mask, jnp.float32), count=jnp.int32(b),
                     answers=jnp.tile(jnp.arange(b)[:, None], (1, 3)), answer_mask=jnp.asarray(answer_mask),
                     labels=jnp.asarray(labels), ids=jnp.arange(b), seq=jnp.arange(b))


def _term(batch, projected, text, kind='gram'):
  """ccl_term of a node whose text embedding of row i is text[i] (answers hold the row index)."""
  node = types.SimpleNamespace(ccl=kind, ccl_anchor='text', tau_ccl=0.5)
  model = types.SimpleNamespace(text_embedding=lambda answers, mask: text[answers[:, 0]])
  return NodeProgram.ccl_term(node, model, projected, batch)


@pytest.fixture
def views():
  k = jax.random.split(jax.random.key(0), 2)
  return jax.random.normal(k[0], (4, 2, D)), jax.random.normal(k[1], (4, D))


def test_same_class_labelled_rows_are_not_negatives(views):
  projected, text = views
  batch = _batch([1, 1, 1, 1], [0, 0, 1, 1], np.ones((4, 2)))
  loss, anchors = _term(batch, projected, text)
  assert float(anchors) == 4.0
  # by hand: the text-anchored GRAM loss with rows {0,1} and {2,3} (same class) excluded from each other
  views_ = jnp.concatenate([text[:, None], projected], 1)
  same = np.eye(4, dtype=bool) | (np.arange(4)[:, None] // 2 == np.arange(4)[None, :] // 2)
  expected = ccl_loss('gram', views_, jnp.ones((4, 3)), 0.5, exclude=jnp.asarray(same))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  unmasked = ccl_loss('gram', views_, jnp.ones((4, 3)), 0.5, exclude=jnp.eye(4, dtype=bool))
  assert abs(float(unmasked) - float(expected)) > 1e-4    # the masking changes the loss
  # one class only: no negatives left, the loss is 0
  assert float(_term(_batch([1, 1], [2, 2], np.ones((2, 2))), projected[:2], text[:2])[0]) == 0.0


def test_unlabelled_rows_join_through_the_modality_volume(views):
  projected, text = views
  batch = _batch([0, 0, 0, 0], [0, 1, 2, 3], np.ones((4, 2)))        # no text anchor at all
  loss, anchors = _term(batch, projected, text)
  assert float(anchors) == 4.0                                       # the old loss had 0 anchors here
  np.testing.assert_allclose(loss, ccl_loss('gram', projected, jnp.ones((4, 2)), 0.5,
                                            exclude=jnp.eye(4, dtype=bool)), rtol=1e-5)
  grad = jax.grad(lambda p: _term(batch, p, text)[0])(projected)
  assert float(jnp.abs(grad).sum()) > 0
  # a mixed batch: 2 text anchors + 2 modality anchors (row 3 lacks modality 0: no modality anchor)
  mixed = _batch([1, 1, 0, 0], [0, 1, 0, 1], np.array([[1, 1], [1, 1], [1, 1], [0, 1]]))
  assert float(_term(mixed, projected, text)[1]) == 3.0
  # the hidden labels of unlabelled rows are never used: changing them changes nothing
  relabelled = _batch([1, 1, 0, 0], [0, 1, 1, 0], np.array([[1, 1], [1, 1], [1, 1], [0, 1]]))
  np.testing.assert_allclose(_term(mixed, projected, text)[0], _term(relabelled, projected, text)[0])


def test_anchor_counts():
  m = jnp.array([[1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0]])
  assert float(ccl_anchors('gram', m)) == 1.0 and float(ccl_anchors('infonce', m)) == 2.0
  assert float(ccl_anchors('none', m)) == 0.0 and float(ccl_anchors('gram', m[:, :1])) == 0.0


def test_gate_telemetry_reads_the_blocks_gates(tiny_config):
  """client/gate_shared, client/gate_private: the mean over blocks of `Block.mix_gates()`."""
  from flax import nnx
  from ml_ecs.algorithms.ml_ecs import amt
  from ml_ecs.models.decoder import DecoderLM
  cfg = tiny_config.edge_model.backbone.to_dict()
  import ml_collections
  bb = DecoderLM(ml_collections.ConfigDict({**cfg, 'gates': 'convex', 'gate_init': 2.0}), 16, rngs=nnx.Rngs(0))
  program = types.SimpleNamespace(model=lambda tr, frozen: types.SimpleNamespace(backbone=tr))
  g = amt.gate_values(program, bb, None)
  np.testing.assert_allclose([g['gate_shared'], g['gate_private']], [0.8808, 0.1192], atol=1e-4)
