"""Model family: LoRA backbone, connector masking, KV-cache decoding, parameter partition."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ml_ecs.models import params
from ml_ecs.models.decoder import DecoderLM
from ml_ecs.models.encoders import ENCODER_TYPES, make_encoder
from ml_ecs.models.keys import KeyStream
from ml_ecs.models.multimodal import MultimodalLM
from ml_ecs.models.variables import Frozen, SharedLoRA, PrivateLoRA

SHAPES = {'accel': (32, 3), 'depth': (8,), 'image': (8, 8)}
MODS = tuple(SHAPES)
VOCAB = 50


def _model(cfg, encoders=None, mods=MODS, seed=0):
  encoders = encoders or {'accel': 'transformer', 'depth': 'mlp', 'image': 'conv1d'}
  return MultimodalLM({m: SHAPES[m] for m in mods}, encoders, MODS, cfg, VOCAB, rngs=nnx.Rngs(seed))


def _inputs(key, b=4):
  ks = jax.random.split(key, 4)
  x = {m: jax.random.normal(k, (b,) + SHAPES[m]) for m, k in zip(MODS, ks)}
  return x, jnp.ones((b, 3))


def _randomize(model, var_type, key, scale=0.5):
  state = nnx.state(model, var_type)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(key, len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


@pytest.mark.parametrize('key', ['seed', 'typed', 'data'])
def test_key_stream_builds_the_parameters_nnx_rngs_builds(tiny_config, key):
  """KeyStream (what the federation builds its models with) gives the parameters of nnx.Rngs bit for bit and the
  same graph, built eagerly and under jit, from a seed, a typed key or raw key data; every encoder type, the
  text projection and the SE-CCL head draw keys."""
  key = {'seed': 7, 'typed': jax.random.key(7), 'data': jax.random.key_data(jax.random.key(7))}[key]
  build = lambda rngs: MultimodalLM(SHAPES, {'accel': 'transformer', 'depth': 'mlp', 'image': 'conv1d'}, MODS,
                                    tiny_config.edge_model, VOCAB, rngs=rngs, text_anchor=True, se_head_dim=8)
  ours, theirs = build(KeyStream(key)), build(nnx.Rngs(key))
  assert nnx.graphdef(ours) == nnx.graphdef(theirs)
  traced = lambda make: jax.jit(lambda: nnx.state(build(make(key))))() if isinstance(key, int) else \
      jax.jit(lambda k: nnx.state(build(make(k))))(key)
  for a, b in [(nnx.state(ours), nnx.state(theirs)), (traced(KeyStream), traced(nnx.Rngs))]:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 20
    for x, y in zip(la, lb):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The keys are drawn in turn, not one key reused: the 2-D frozen kernels differ from one another.
  k = jax.tree.leaves(nnx.state(ours, Frozen))
  assert len({np.asarray(x).tobytes() for x in k if x.ndim == 2}) > 5


def test_lora_with_zero_b_leaves_logits_unchanged(tiny_config):
  cfg = tiny_config.edge_model.backbone
  lora = DecoderLM(cfg, VOCAB, rngs=nnx.Rngs(0))
  plain_cfg = cfg.copy_and_resolve_references()
  plain_cfg.lora_rank = 0
  plain = DecoderLM(plain_cfg, VOCAB, rngs=nnx.Rngs(1))
  nnx.update(plain, nnx.state(lora, Frozen))          # same frozen weights, no adapters
  x = jax.random.normal(jax.random.key(2), (2, 10, cfg.width))
  mask = jnp.ones((2, 10))
  base, _ = plain(x, mask)
  with_lora, _ = lora(x, mask)
  np.testing.assert_allclose(with_lora, base, rtol=1e-6, atol=1e-6)
  # The adapters are live: nonzero B changes the logits.
  for block in lora.blocks:
    block.qkv.shared_b[...] = 0.5 * jnp.ones_like(block.qkv.shared_b[...])
  changed, _ = lora(x, mask)
  assert float(jnp.abs(changed - base).max()) > 1e-3


def test_one_step_changes_only_trainable_parts(tiny_config):
  model = _model(tiny_config.edge_model)
  _randomize(model, SharedLoRA, jax.random.key(3), 0.05)
  _randomize(model, PrivateLoRA, jax.random.key(4), 0.05)
  graphdef, parts = params.split_model(model)
  trainable = {k: parts[k] for k in params.TRAINABLE}
  x, mask = _inputs(jax.random.key(5))
  instr = jnp.ones((4, 3), jnp.int32)
  answer = jax.random.randint(jax.random.key(6), (4, 5), 2, VOCAB)

  def loss_fn(tr):
    m = params.merge_model(graphdef, {**tr, 'frozen': parts['frozen']})
    _, z = m.encode(x, mask)
    logits = m(z, instr, jnp.ones((4, 3)), answer, jnp.ones((4, 5)))
    return optax.softmax_cross_entropy_with_integer_labels(logits, answer).mean()

  tx = optax.adam(1e-2)
  grads = jax.jit(jax.grad(loss_fn))(trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  new = optax.apply_updates(trainable, updates)
  model2 = params.merge_model(graphdef, {**new, 'frozen': parts['frozen']})
  _, parts2 = params.split_model(model2)
  for a, b in zip(jax.tree.leaves(parts['frozen']), jax.tree.leaves(parts2['frozen'])):
    np.testing.assert_array_equal(a, b)
  for part in params.TRAINABLE:
    diff = sum(float(jnp.abs(a - b).sum()) for a, b in zip(jax.tree.leaves(parts[part]), jax.tree.leaves(parts2[part])))
    assert diff > 0, part


def test_missing_modality_does_not_affect_z(tiny_config):
  model = _model(tiny_config.edge_model)
  x, _ = _inputs(jax.random.key(7))
  mask = jnp.array([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]], jnp.float32)
  encode = nnx.jit(lambda m, x, mask: m.encode(x, mask)[1])
  z = encode(model, x, mask)
  x2 = dict(x)
  x2['depth'] = x['depth'].at[0].set(x['depth'][0] * 100 + 5)  # sample 0 misses depth
  x2['image'] = x['image'].at[1].set(jnp.nan)  # sample 1 misses image
  x2['accel'] = x['accel'].at[2].set(1e6)  # sample 2 misses accel
  x2['depth'] = x2['depth'].at[3].set(0.0)
  z2 = encode(model, x2, mask)
  np.testing.assert_array_equal(z[:3], z2[:3])
  assert not np.allclose(z[3], z2[3])      # sample 3 has depth present: it does change
  # Removing a present modality changes z.
  z3 = encode(model, x, mask.at[3, 0].set(0.0))
  assert float(jnp.abs(z3[3] - z[3]).max()) > 1e-4


@pytest.mark.parametrize('kind', ENCODER_TYPES)
@pytest.mark.parametrize('mod', MODS)
def test_encoders(kind, mod):
  enc = make_encoder(kind, SHAPES[mod], 16, 8, rngs=nnx.Rngs(0))
  out = enc(jnp.ones((3,) + SHAPES[mod]))
  assert out.shape == (3, 8) and bool(jnp.isfinite(out).all())


def test_unknown_encoder_is_a_clear_error():
  with pytest.raises(ValueError, match='unknown encoder type'):
    make_encoder('lstm', (8,), 16, 8, rngs=nnx.Rngs(0))


def test_kv_cache_decoding_equals_recompute(tiny_config):
  model = _model(tiny_config.edge_model)
  _randomize(model, SharedLoRA, jax.random.key(8), 0.3)
  _randomize(model, Frozen, jax.random.key(9), 0.3)  # peaky logits: many different tokens
  x, _ = _inputs(jax.random.key(10), b=3)
  mask = jnp.array([[1, 1, 1], [0, 1, 0], [1, 0, 1]], jnp.float32)
  z = nnx.jit(lambda m: m.encode(x, mask)[1])(model)
  instr = jnp.array([[5, 6, 7, 0], [5, 6, 0, 0], [8, 9, 10, 11]], jnp.int32)
  instr_mask = (instr > 0).astype(jnp.float32)
  cached = jax.jit(lambda z: model.generate(z, instr, instr_mask, 10))(z)
  plain = nnx.jit(lambda m, z: m.generate(z, instr, instr_mask, 10, use_cache=False))(model, z)
  np.testing.assert_array_equal(cached, plain)
  assert len(np.unique(np.asarray(cached))) >= 3   # not a degenerate constant sequence


def test_partition_stack_and_count(tiny_config):
  model = _model(tiny_config.edge_model)
  graphdef, parts = params.split_model(model)
  assert set(parts) == set(params.PARTS)
  counts = params.count_parts(parts)
  assert counts['total']['params'] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
  assert counts['frozen']['params'] > counts['shared']['params'] > 0
  others = [params.split_model(_model(tiny_config.edge_model, seed=s))[1]['private'] for s in (1, 2)]
  stacked = params.stack(others)
  assert jax.tree.leaves(stacked)[0].shape[0] == 2
  for orig, back in zip(others, params.unstack(stacked)):
    jax.tree.map(np.testing.assert_array_equal, orig, back)
  # A vmapped forward over a stacked cohort with the frozen backbone broadcast, not copied.
  trainables = [params.split_model(_model(tiny_config.edge_model, seed=s))[1] for s in (1, 2)]
  stacked = params.stack([{k: t[k] for k in params.TRAINABLE} for t in trainables])
  x, mask = _inputs(jax.random.key(11), b=2)

  def fused(tr, frozen):
    return params.merge_model(graphdef, {**tr, 'frozen': frozen}).encode(x, mask)[1]

  zs = jax.jit(jax.vmap(fused, in_axes=(0, None)))(stacked, parts['frozen'])
  for i, t in enumerate(trainables):
    np.testing.assert_allclose(zs[i], jax.jit(fused)({k: t[k] for k in params.TRAINABLE}, parts['frozen']), rtol=1e-5, atol=1e-5)


def test_pretraining_in_chunks_equals_one_scan(tiny_config):
  """The progress bar's chunked pretraining computes what one scan over all steps does: bit for bit under
  XLA's default flags; to float rounding under the suite's light optimisation (tests/paths.FAST_COMPILE),
  where XLA's code for a 4-step and a 9-step scan may round differently."""
  import numpy as np
  from ml_ecs.data.embedded import load_default
  from ml_ecs.backbones.pretrain import pretrain_backbone
  from ml_ecs.data.text import build_task_text
  from flax import nnx
  cfg = tiny_config
  text = build_task_text(load_default(), cfg.text)
  pre = cfg.pretrain.copy_and_resolve_references()
  pre.steps = 9
  one, info_one = pretrain_backbone(cfg.edge_model.backbone, cfg.edge_model.prompt_len, text, pre, 0, chunk=9)
  parts, info_parts = pretrain_backbone(cfg.edge_model.backbone, cfg.edge_model.prompt_len, text, pre, 0, chunk=4)
  np.testing.assert_allclose([info_one[k] for k in sorted(info_one)], [info_parts[k] for k in sorted(info_parts)],
                             rtol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(one)), jax.tree.leaves(nnx.to_pure_dict(parts))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
