"""The faithful defaults of the full ML-ECS method (the `ml_ecs` strategy, configs/default.py), one test per
option; each test fails when its option is broken:

- AMT: convex gates mix g * shared + (1 - g) * private, sum to one and start toward the shared adapter;
  a client's global view is its shared adapter alone (gate fully on shared, private adapter zero);
- MMA: a modality's shared projection starts from the same initialisation on every client holding that
  modality, and its leaves are averaged over the holders weighted by their present observations;
- CCL: GRAM is anchored on the answer text (not on the order of the modalities); duplicates and samples of
  the same sequence are not negatives;
- SE-CCL: alignment goes through a projection head (whose output is what is uploaded), is off during the
  warm-up rounds, and a client takes the server's targets only where the server is the more reliable;
- scarce labels and scores: unlabelled samples give no LM gradient; the warm-up cosine learning rate;
  ROUGE against several reference answers; a generic pretraining corpus holds no answer sentence;
- the fields of these options are validated, and the discriminating study's configs validate.

The same options on a whole tiny federation: tests/integration/test_faithful.py."""
import copy
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ml_ecs.core.context import RoundContext
from ml_ecs.losses.se_ccl import se_ccl_loss
from ml_ecs.aggregation import mean
from ml_ecs.algorithms.ml_ecs import amt, mma, se_ccl
from ml_ecs.losses import ccl
from ml_ecs.models import params
from ml_ecs.data.cohort_data import SplitArrays, labelled_rows
from ml_ecs.core.scoring import TextScorer
from ml_ecs.losses.lm import lm_loss
from ml_ecs.models.decoder import Block
from ml_ecs.models.multimodal import MultimodalLM, modality_key
from ml_ecs.core.node import NodeProgram, StageSpec, learning_rate, make_optimizer

VOCAB = 40
SHAPES = {'accel': (16, 3), 'depth': (8,), 'image': (12,)}


def _model(cfg, mods, enc, seed, **kw):
  return MultimodalLM({m: SHAPES[m] for m in mods}, enc, tuple(SHAPES), cfg.edge_model, VOCAB,
                      rngs=nnx.Rngs(seed), **kw)


def _program(model, ccl_anchor='text'):
  graphdef, _ = params.split_model(model)
  instr = jnp.array([1, 2, 3], jnp.int32)
  return NodeProgram(graphdef, len(model.modalities), instr, jnp.ones(3), 'gram', 0.2, 0.2, 4,
                     make_optimizer(ml_collections.ConfigDict(dict(learning_rate=1e-3, clip_norm=1.0,
                                                                   weight_decay=0.0))),
                     ccl_anchor=ccl_anchor)


def _batch(mods, b=4, seed=0, answers=None, answer_mask=None):
  k = jax.random.key(seed)
  inputs = {m: jax.random.normal(jax.random.fold_in(k, i), (b,) + SHAPES[m]) for i, m in enumerate(mods)}
  ans = answers if answers is not None else jax.random.randint(k, (b, 5), 4, VOCAB)
  return SplitArrays(inputs=inputs, mod_mask=jnp.ones((b, len(mods))), count=jnp.int32(b), answers=ans,
                     answer_mask=answer_mask if answer_mask is not None else jnp.ones((b, 5)),
                     labels=jnp.zeros((b,), jnp.int32), ids=jnp.arange(b), seq=jnp.arange(b))


def _parts(model):
  _, p = params.split_model(model)
  return {k: p[k] for k in params.TRAINABLE}, p['frozen']


# ---------------------------------------------------------------------------- AMT gates
def test_convex_gates_sum_to_one_and_start_toward_shared(tiny_config):
  bcfg = ml_collections.ConfigDict({**tiny_config.edge_model.backbone.to_dict(), 'gates': 'convex', 'gate_init': 2.0})
  block = Block(bcfg, rngs=nnx.Rngs(0))
  g = np.asarray(block.mix_gates())
  np.testing.assert_allclose(g.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(g[0], 1 / (1 + np.exp(-2.0)), rtol=1e-6)
  block.gate.set_value(jnp.array([-3.0, 5.0]))
  np.testing.assert_allclose(np.asarray(block.mix_gates()).sum(), 1.0, rtol=1e-6)
  old = Block(tiny_config.edge_model.backbone, rngs=nnx.Rngs(0))   # 'scaled' stays the default form
  np.testing.assert_allclose(np.asarray(old.mix_gates()), [1.0, 1.0])


def test_global_view_is_shared_adapter_alone(tiny_config):
  model = _model(tiny_config, ('accel', 'depth'), {'accel': 'mlp', 'depth': 'mlp'}, 0, gates='convex')
  tr, _ = _parts(model)
  g_shared = jax.tree.map(lambda x: x + 1.0, tr['shared'])
  view = amt.global_view(tr, g_shared, 'convex')
  jax.tree.map(np.testing.assert_array_equal, view['shared'], g_shared)
  m = params.merge_model(params.split_model(model)[0], {**view, 'frozen': params.split_model(model)[1]['frozen']})
  np.testing.assert_allclose(np.asarray(m.backbone.blocks[0].mix_gates()), [1.0, 0.0], atol=1e-6)
  assert all(float(jnp.abs(x).max()) == 0 for p, x in jax.tree_util.tree_leaves_with_path(view['private'])
             if 'gate' not in jax.tree_util.keystr(p))


# ---------------------------------------------------------------------------- MMA coordinates
def test_modality_projection_same_init_on_every_holder(tiny_config):
  a = _model(tiny_config, ('accel', 'depth'), {'accel': 'conv1d', 'depth': 'mlp'}, 1, modality_params='projection',
             shared_seed=3)
  b = _model(tiny_config, ('accel',), {'accel': 'transformer'}, 2, modality_params='projection', shared_seed=3)
  for m in SHAPES:   # different clients, encoders and keys: the same shared projection of every modality
    np.testing.assert_array_equal(a.adapters[m].kernel[...], b.adapters[m].kernel[...])
  assert not np.allclose(a.adapters['accel'].kernel[...], a.adapters['depth'].kernel[...])
  c = _model(tiny_config, ('accel',), {'accel': 'mlp'}, 1, modality_params='projection', shared_seed=4)
  assert not np.allclose(a.adapters['accel'].kernel[...], c.adapters['accel'].kernel[...])   # seed matters
  assert modality_key('accel', 3).shape == ()
  # The old adapters draw their init from the client's key.
  d, e = (_model(tiny_config, ('accel',), {'accel': 'mlp'}, s) for s in (1, 2))
  assert not np.allclose(d.adapters['accel'].a[...], e.adapters['accel'].a[...])


def test_modality_leaves_averaged_over_holders_by_present_observations():
  w = np.array([10.0, 20.0, 30.0])
  has = np.array([[1, 1], [1, 0], [0, 1]], np.float32)
  obs = np.array([[4, 9], [20, 0], [0, 3]], np.float32)    # present samples per modality
  mw = mma.modality_weights('observations', w, has, obs)
  np.testing.assert_array_equal(mw, obs)
  np.testing.assert_array_equal(mma.modality_weights('client', w, has, obs), w[:, None] * has)
  tree = {'bb': jnp.array([[1.0], [2.0], [3.0]]), 'm1': jnp.array([[1.0], [5.0], [100.0]])}
  leaf_mod = {'bb': -1, 'm1': 1}
  prev = jax.tree.map(lambda x: x[0], tree)
  out, _ = mean.modality_mean([tree], [jnp.asarray(w)], [jnp.asarray(mw)], prev, leaf_mod, True)
  np.testing.assert_allclose(out['bb'], [(10 + 40 + 90) / 60], rtol=1e-6)
  np.testing.assert_allclose(out['m1'], [(9 * 1 + 3 * 100) / 12], rtol=1e-6)   # client 1 lacks modality 1


# ---------------------------------------------------------------------------- CCL
def test_gram_is_text_anchored(tiny_config):
  mods = ('accel', 'depth', 'image')
  model = _model(tiny_config, mods, {m: 'mlp' for m in mods}, 0, text_anchor=True)
  prog = _program(model)
  tr, frozen = _parts(model)
  m = prog.model(tr, frozen)
  batch = dataclasses.replace(_batch(mods), labels=jnp.arange(4))   # four classes (same-class rows are no negatives)
  projected, _ = m.encode(batch.inputs, batch.mod_mask)
  loss = prog.ccl_term(m, projected, batch)[0]
  other = dataclasses.replace(batch, answers=batch.answers.at[0].set((batch.answers[0] + 7) % VOCAB))
  assert abs(float(prog.ccl_term(m, projected, other)[0]) - float(loss)) > 1e-6     # the answer text matters
  perm = [2, 0, 1]
  swapped = prog.ccl_term(m, projected[:, perm], dataclasses.replace(batch, mod_mask=batch.mod_mask[:, perm]))[0]
  np.testing.assert_allclose(float(swapped), float(loss), rtol=1e-5)              # modality order does not
  # The modality anchor depends on the order and not on the text.
  mprog = dataclasses.replace(prog, ccl_anchor='modality')
  np.testing.assert_allclose(float(mprog.ccl_term(m, projected, other)[0]), float(mprog.ccl_term(m, projected, batch)[0]))


def test_duplicates_and_same_sequence_are_not_negatives():
  emb = jax.random.normal(jax.random.key(0), (4, 3, 8))
  emb = emb.at[1].set(emb[0])
  mask = jnp.ones((4, 3))
  same = jnp.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bool)
  plain = ccl.gram_contrastive_loss(emb, mask, 0, 0.2)
  masked = ccl.gram_contrastive_loss(emb, mask, 0, 0.2, exclude=same)
  assert float(masked) < float(plain)     # the duplicate no longer competes with the positive
  # Without a false negative in the batch the mask is a no-op (the diagonal is never excluded).
  np.testing.assert_allclose(float(ccl.gram_contrastive_loss(emb, mask, 0, 0.2, exclude=jnp.eye(4, dtype=bool))),
                             float(plain), rtol=1e-6)
  assert float(ccl.pairwise_infonce_loss(emb, mask, 0.2, exclude=same)) < float(ccl.pairwise_infonce_loss(emb, mask, 0.2))


# ---------------------------------------------------------------------------- SE-CCL
def test_se_ccl_goes_through_the_projection_head(tiny_config):
  mods = ('accel', 'depth')
  model = _model(tiny_config, mods, {m: 'mlp' for m in mods}, 0, se_head_dim=tiny_config.edge_model.d_z)
  prog = _program(model, 'modality')
  tr, frozen = _parts(model)
  batch = _batch(mods)
  targets = jax.random.normal(jax.random.key(9), (4, tiny_config.edge_model.d_z))
  ctx = RoundContext(frozen, targets, jnp.ones(4))
  spec = StageSpec(1, params.TRAINABLE, lambda_se_ccl=1.0)
  m = prog.model(tr, frozen)
  _, z = m.encode(batch.inputs, batch.mod_mask)
  term = prog.losses(tr, frozen, batch, spec, ctx)['se_ccl']
  via_head = se_ccl_loss(m.align(z), targets, batch.ids, batch.ids, jnp.ones(4), jnp.ones(4), 0.2)
  direct = se_ccl_loss(z, targets, batch.ids, batch.ids, jnp.ones(4), jnp.ones(4), 0.2)
  np.testing.assert_allclose(float(term), float(via_head), rtol=1e-6)
  assert abs(float(term) - float(direct)) > 1e-4                  # z itself is not what is aligned
  grads = jax.grad(lambda t: prog.losses(t, frozen, batch, spec, ctx)['se_ccl'])(tr)
  head = [float(jnp.abs(x).max()) for p, x in jax.tree_util.tree_leaves_with_path(grads['connector'])
          if 'se_head' in jax.tree_util.keystr(p)]
  assert head and max(head) > 0                                    # the alignment gradient reaches the head
  np.testing.assert_array_equal(prog.encode_split(tr, frozen, batch)[0], m.align(z))   # what is uploaded


def test_no_alignment_before_warmup_and_reliability_weights(tiny_config):
  assert not se_ccl.warm(0, 2) and not se_ccl.warm(1, 2) and se_ccl.warm(2, 2)
  assert float(se_ccl.client_target_weight(1.0, 0.5, 0.0, True)) == 0.0       # warm-up: off
  assert float(se_ccl.client_target_weight(1.0, 0.5, 1.0, True)) == 1.0       # server more reliable
  assert float(se_ccl.client_target_weight(0.4, 0.5, 1.0, True)) == 0.0       # server worse: no target
  assert float(se_ccl.client_target_weight(0.4, 0.5, 1.0, False)) == 1.0
  np.testing.assert_array_equal(se_ccl.upload_weights(jnp.array([2., 3., 4.]), jnp.array([0.3, 0.9, 0.5]), 0.5, 1.0, True),
                                [2., 0., 4.])
  np.testing.assert_array_equal(se_ccl.upload_weights(jnp.array([2., 3.]), jnp.array([0.3, 0.9]), 0.5, 0.0, True), [0., 0.])
  # Zero target weight (warm-up): the term and its gradient are zero.
  mods = ('accel',)
  model = _model(tiny_config, mods, {'accel': 'mlp'}, 0, se_head_dim=tiny_config.edge_model.d_z)
  prog = _program(model, 'modality')
  tr, frozen = _parts(model)
  ctx = RoundContext(frozen, jnp.ones((4, tiny_config.edge_model.d_z)), jnp.zeros(4))
  spec = StageSpec(1, params.TRAINABLE, lambda_se_ccl=1.0)
  value, grads = jax.value_and_grad(lambda t: prog.losses(t, frozen, _batch(mods), spec, ctx)['se_ccl'])(tr)
  assert float(value) == 0.0 and max(float(jnp.abs(x).max()) for x in jax.tree.leaves(grads)) == 0.0


# ---------------------------------------------------------------------------- labels, schedule, scores
def test_unlabelled_samples_give_no_lm_gradient(tiny_config):
  mods = ('depth',)
  model = _model(tiny_config, mods, {'depth': 'mlp'}, 0)
  prog = _program(model, 'modality')
  tr, frozen = _parts(model)
  spec = StageSpec(1, params.TRAINABLE)
  lab = jnp.array([1.0, 0.0, 1.0, 0.0])[:, None] * jnp.ones((4, 5))
  a = _batch(mods, answer_mask=lab)
  b = dataclasses.replace(a, answers=a.answers.at[1].set(3).at[3].set(5))   # only unlabelled answers change
  ga, gb = (jax.grad(lambda t, x=x: prog.losses(t, frozen, x, spec, {})['lm'])(tr) for x in (a, b))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8), ga, gb)
  rows = labelled_rows(50, 0.2, 0, 3)
  assert rows.sum() == 10 and np.array_equal(rows, labelled_rows(50, 0.2, 0, 3))
  assert labelled_rows(50, 1.0, 0, 3).sum() == 50 and labelled_rows(3, 0.01, 0, 1).sum() == 1


def test_warmup_cosine_schedule():
  cfg = ml_collections.ConfigDict(dict(learning_rate=1e-2, lr_schedule='warmup_cosine', warmup_steps=5))
  lr = learning_rate(cfg, 50)
  assert float(lr(0)) == 0.0 and abs(float(lr(5)) - 1e-2) < 1e-9 and float(lr(50)) < 1e-6
  assert learning_rate(ml_collections.ConfigDict(dict(learning_rate=1e-2, lr_schedule='constant')), 50) == 1e-2


def test_multi_reference_rouge():
  scorer = TextScorer([('a person is walking slowly', 'someone walks at a slow pace'), ('the person falls',)])
  preds = ['someone walks at a slow pace', 'the person falls down']
  refs = ['a person is walking slowly', 'the person falls']
  single = scorer.score(preds, refs, [0, 1])
  assert single['rougeLsum_multi'] >= single['rougeLsum'] and single['rougeLsum_multi'] > single['rougeLsum'] + 0.1
  one = scorer.score(preds[1:], refs[1:], [1])    # one paraphrase: equal
  assert one['rougeLsum_multi'] == pytest.approx(one['rougeLsum'])


def test_generic_corpus_has_no_answer_sentence(tiny_config, dataset):
  from ml_ecs.backbones.pretrain import generic_corpus
  from ml_ecs.data.text import build_task_text
  text = build_task_text(dataset, tiny_config.text)
  tokens, mask = generic_corpus(text, num=256)
  decoded = {' '.join(s.split()) for s in text.tokenizer.decode(tokens)}
  answers = {' '.join(r.lower().split()) for r in text.references}
  assert len(decoded) > 50 and not decoded & answers


def test_new_fields_are_validated(tiny_config):
  from ml_ecs.config.validation import ConfigError, validate
  for field, bad in (('method.gates', 'soft'), ('method.modality_params', 'x'), ('method.mma_modality', 'x'),
                     ('method.ccl_anchor', 'x'), ('method.se_ccl_head', 'x'), ('method.se_ccl_warmup', -1),
                     ('method.se_ccl_reliability', 'x'), ('train.lr_schedule', 'x'), ('train.warmup_steps', -1),
                     ('data.label_fraction', 0.0), ('data.server_label_fraction', 2.0),
                     ('pretrain.corpus', 'x')):
    cfg = copy.deepcopy(tiny_config)
    section, name = field.split('.')
    cfg[section][name] = bad
    with pytest.raises(ConfigError, match=field):
      validate(cfg)
  validate(copy.deepcopy(tiny_config))


def test_discriminating_configs_validate():
  from studies.compare.configs import discriminating
  from ml_ecs.config.validation import validate
  for v in discriminating.VARIANTS:
    cfg = validate(discriminating.get_config(v))
    assert cfg.pretrain.corpus == 'generic'
  assert discriminating.get_config('server_scarce').data.server_label_fraction < 1
