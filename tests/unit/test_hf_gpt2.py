"""Hugging Face GPT-2 import/export and PEFT adapters (ml_ecs.backbones.hf_gpt2, ml_ecs.backbones.peft_io).

Three tiers:
- always (CI: transformers + safetensors, no torch): checkpoints and adapters written
  from our side and read back, config round trip, tokenizer wrapper, errors;
- fixture: parity with logits that transformers / PEFT computed (tests/fixtures/hf_gpt2,
  made by tests/fixtures/make_hf_fixture.py); skipped while the fixture is missing;
- live: where torch, transformers and peft import, the fixture is rebuilt in a temporary
  directory and our exports are loaded by GPT2LMHeadModel / PeftModel.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

pytest.importorskip('transformers')
pytest.importorskip('safetensors')

from ml_ecs.models import params
from ml_ecs.backbones import hf_gpt2, peft_io  # noqa: E402
from ml_ecs.models import decoder  # noqa: E402
from ml_ecs.models.decoder import Block, DecoderLM  # noqa: E402
from ml_ecs.models.variables import Frozen, Gate, PrivateLoRA, SharedLoRA  # noqa: E402
from ml_ecs.data.tokenizer import HFTokenizer, TextTokenizer  # noqa: E402
from tests.paths import FIXTURES

FIXTURE = os.path.join(FIXTURES, 'hf_gpt2')
# float32 logits of two implementations (different summation orders): measured max |delta|
# is ~1e-6 on this fixture (|logits| up to ~10); 1e-4 leaves room for other BLAS builds.
ATOL = 1e-4
VOCAB = 61


def _cfg(**kw) -> ml_collections.ConfigDict:
  base = dict(width=32, layers=2, heads=2, mlp_ratio=4, max_len=24, lora_rank=2, lora_alpha=4.0,
              lora_targets=('qkv', 'attn_out', 'mlp_in', 'mlp_out'))
  return ml_collections.ConfigDict({**base, **kw})


VARIANT = dict(activation='gelu', ln_eps=1e-6, mlp_dim=48, scale_attn_by_inverse_layer_idx=True)


def _randomize(model, var_type, key, scale):
  state = nnx.state(model, var_type)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(key, len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


def _random_model(cfg, seed=0, vocab=VOCAB) -> DecoderLM:
  """A DecoderLM with every weight random (frozen, both LoRAs, gates), so nothing is trivially zero."""
  m = DecoderLM(cfg, vocab, rngs=nnx.Rngs(seed))
  _randomize(m, Frozen, jax.random.key(seed + 1), 0.3)
  _randomize(m, SharedLoRA, jax.random.key(seed + 2), 0.3)
  _randomize(m, PrivateLoRA, jax.random.key(seed + 3), 0.3)
  _randomize(m, Gate, jax.random.key(seed + 4), 1.0)
  return m


def _logits(model: DecoderLM, ids, mask) -> np.ndarray:
  ids = jnp.asarray(ids)
  return np.asarray(model(model.embed(ids), jnp.asarray(mask, jnp.float32))[0])


def _ids(vocab=VOCAB, b=3, t=11):
  ids = np.random.RandomState(0).randint(0, vocab, (b, t))
  mask = np.ones((b, t), np.float32)
  mask[1, -4:] = 0
  return ids, mask


def _maxdiff(a, b, mask):
  return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask) > 0].max())


def _assert_same_arch(got, want):
  for k in want:
    if not (k == 'mlp_ratio' and 'mlp_dim' in want):   # mlp_dim overrides mlp_ratio
      assert got[k] == want[k], k
  assert decoder.mlp_dim(got) == decoder.mlp_dim(want)


def _trainables(parts):
  return {k: parts[k] for k in params.TRAINABLE}


# ----------------------------------------------------------------------------- decoder options


def test_decoder_default_options_are_the_old_behaviour():
  cfg = _cfg()
  explicit = _cfg(activation='gelu_new', ln_eps=1e-5, scale_attn_weights=True,
                  scale_attn_by_inverse_layer_idx=False)
  ids, mask = _ids()
  a = _logits(_random_model(cfg), ids, mask)
  b = _logits(_random_model(explicit), ids, mask)
  np.testing.assert_array_equal(a, b)
  # jax.nn.gelu (the old MLP nonlinearity) is the tanh form, GPT-2's 'gelu_new'.
  x = jnp.linspace(-4, 4, 101)
  np.testing.assert_allclose(jax.nn.gelu(x), 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (x + 0.044715 * x ** 3))),
                             atol=1e-6)
  for field, value in {**VARIANT, 'ln_eps': 0.5, 'scale_attn_weights': False}.items():
    other = _logits(_random_model(_cfg(**{field: value})), ids, mask)
    assert np.abs(other - a).max() > 1e-4, f'{field}={value} has no effect'
  with pytest.raises(ValueError, match="activation 'nope'"):
    DecoderLM(_cfg(activation='nope'), VOCAB, rngs=nnx.Rngs(0))


def test_block_call_uses_mix_gates(monkeypatch):
  cfg = _cfg()
  m = _random_model(cfg)
  ids, mask = _ids()
  g = np.asarray(m.blocks[0].mix_gates())
  np.testing.assert_allclose(g, 2 * jax.nn.sigmoid(m.blocks[0].gate[...]), rtol=1e-6)
  plain_cfg = _cfg(lora_rank=0)
  plain = DecoderLM(plain_cfg, VOCAB, rngs=nnx.Rngs(9))
  nnx.update(plain, nnx.state(m, Frozen))
  assert np.abs(_logits(m, ids, mask) - _logits(plain, ids, mask)).max() > 1e-3
  # Zero gates switch both adapters off: __call__ must go through mix_gates.
  monkeypatch.setattr(Block, 'mix_gates', lambda self: jnp.zeros((2,)))
  np.testing.assert_allclose(_logits(m, ids, mask), _logits(plain, ids, mask), atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints, no torch


@pytest.mark.parametrize('arch', [{}, VARIANT], ids=['default', 'variant'])
def test_export_import_checkpoint_roundtrip(tmp_path, arch):
  cfg = _cfg(**arch)
  tok = TextTokenizer.train(['the person is walking', 'a fall to the floor'], vocab_size=VOCAB + 200)
  m = _random_model(cfg, vocab=tok.vocab_size)
  frozen = nnx.to_pure_dict(nnx.state(m, Frozen))
  out = hf_gpt2.export_hf_gpt2(nnx.state(m, Frozen), cfg, tmp_path / 'ckpt', tokenizer=tok)
  assert sorted(os.listdir(out)) >= ['config.json', 'model.safetensors']
  bb = hf_gpt2.load_hf_gpt2(out, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
  _assert_same_arch(bb.config, cfg)
  jax.tree.map(np.testing.assert_array_equal, bb.frozen, jax.tree.map(np.asarray, frozen))
  # Same frozen weights and the same (zero) adapters: identical logits.
  fresh = bb.model(seed=5)
  plain = DecoderLM(cfg, tok.vocab_size, rngs=nnx.Rngs(5))
  nnx.update(plain, nnx.state(m, Frozen))
  ids, mask = _ids(tok.vocab_size)
  np.testing.assert_array_equal(_logits(fresh, ids, mask), _logits(plain, ids, mask))
  # The tokenizer travels with the checkpoint and encodes as ours did.
  texts = ['the person is walking', 'a fall']
  for a, b in zip(bb.tokenizer.encode(texts, 24), tok.encode(texts, 24)):
    np.testing.assert_array_equal(a, b)
  assert bb.tokenizer.decode(tok.encode(texts, 24)[0]) == texts


def _numpy_gpt2_logits(tensors: dict, hf, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """GPT-2 forward written from transformers' modeling_gpt2 semantics over the state-dict names
  (an independent check of which tensor plays which role; no torch)."""
  t = {k.removeprefix('transformer.'): np.asarray(v, np.float64) for k, v in tensors.items()}
  from scipy.special import erf
  acts = {'gelu_new': lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
          'gelu': lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))}
  act = acts[hf.activation_function]

  def ln(x, name):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + hf.layer_norm_epsilon) * t[f'{name}.weight'] + t[f'{name}.bias']

  conv1d = lambda x, name: x @ t[f'{name}.weight'] + t[f'{name}.bias']   # Conv1D: weight [in, out]
  b, n = ids.shape
  nh, hd = hf.n_head, hf.n_embd // hf.n_head
  h = t['wte.weight'][ids] + t['wpe.weight'][np.arange(n)]
  allowed = np.tril(np.ones((n, n), bool))[None, None] & (mask[:, None, None, :] > 0)
  for i in range(hf.n_layer):
    q, k, v = np.split(conv1d(ln(h, f'h.{i}.ln_1'), f'h.{i}.attn.c_attn'), 3, axis=-1)
    q, k, v = (y.reshape(b, n, nh, hd).transpose(0, 2, 1, 3) for y in (q, k, v))
    w = q @ k.transpose(0, 1, 3, 2)
    if hf.scale_attn_weights:
      w = w / np.sqrt(hd)
    if hf.scale_attn_by_inverse_layer_idx:
      w = w / (i + 1)
    w = np.where(allowed, w, -1e30)
    w = np.exp(w - w.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    a = (w @ v).transpose(0, 2, 1, 3).reshape(b, n, hf.n_embd)
    h = h + conv1d(a, f'h.{i}.attn.c_proj')
    h = h + conv1d(act(conv1d(ln(h, f'h.{i}.ln_2'), f'h.{i}.mlp.c_fc')), f'h.{i}.mlp.c_proj')
  return ln(h, 'ln_f') @ t['wte.weight'].T


@pytest.mark.parametrize('arch', [{}, VARIANT], ids=['default', 'variant'])
def test_imported_model_matches_numpy_gpt2_reference(tmp_path, arch):
  pytest.importorskip('scipy')
  from safetensors.numpy import load_file
  cfg = _cfg(**arch)
  m = _random_model(cfg)
  out = hf_gpt2.export_hf_gpt2(nnx.state(m, Frozen), cfg, tmp_path / 'ckpt')
  bb = hf_gpt2.load_hf_gpt2(out, load_tokenizer=False)
  ids, mask = _ids()
  ref = _numpy_gpt2_logits(load_file(os.path.join(out, 'model.safetensors')), bb.hf_config, ids, mask)
  diff = _maxdiff(_logits(bb.model(), ids, mask), ref, mask)
  print(f'imported DecoderLM vs numpy GPT-2 ({"variant" if arch else "default"}): max |dlogit| = {diff:.2e}')
  assert diff < ATOL


def test_hf_config_roundtrip(tmp_path):
  from transformers import AutoConfig
  for arch in ({}, VARIANT):
    cfg = _cfg(**arch)
    hf = hf_gpt2.hf_config_from_backbone(cfg, VOCAB, eos_id=3)
    hf.save_pretrained(tmp_path)
    hf2 = AutoConfig.from_pretrained(tmp_path)
    assert (hf2.model_type, hf2.n_embd, hf2.n_layer, hf2.n_head, hf2.n_positions, hf2.vocab_size) == \
        ('gpt2', 32, 2, 2, 24, VOCAB)
    assert hf2.activation_function == cfg.get('activation', 'gelu_new')
    assert hf2.n_inner == (48 if arch else None)
    back = hf_gpt2.backbone_config_from_hf(hf2, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    _assert_same_arch(back, cfg)


def test_hf_tokenizer_gpt2_convention(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
  from transformers import GPT2TokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(['walking and falling', 'sitting still'], trainers.BpeTrainer(
      vocab_size=280, special_tokens=['<|endoftext|>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  GPT2TokenizerFast(tokenizer_object=tok, eos_token='<|endoftext|>', bos_token='<|endoftext|>',
                    unk_token='<|endoftext|>').save_pretrained(tmp_path)
  h = HFTokenizer.from_pretrained(tmp_path, vocab_size=300)
  assert h.pad_id == h.eos_id == 0 and h.vocab_size == 300
  ids, mask = h.encode(['walking', 'sitting still'], 10)
  n = mask.sum(1).astype(int)
  assert ids.dtype == np.int32 and (ids[mask == 0] == h.pad_id).all()
  assert (ids[np.arange(2), n - 1] == h.eos_id).all()          # eos is a real, unmasked token
  assert h.decode(ids) == ['walking', 'sitting still']
  ids2, mask2 = h.encode(['walking'], 10, add_eos=False)
  assert mask2.sum() == n[0] - 1
  with pytest.raises(ValueError, match='more than the configured length'):
    h.encode(['walking and falling and sitting still'], 3)
  with pytest.raises(ValueError, match='more than the model vocabulary'):
    HFTokenizer.from_pretrained(tmp_path, vocab_size=10)
  with pytest.raises(FileNotFoundError, match='tokenizer directory'):
    HFTokenizer.from_pretrained(tmp_path / 'missing')


def _write_ckpt(path, cfg, m, **tensor_edits):
  from safetensors.numpy import save_file
  out = hf_gpt2.export_hf_gpt2(nnx.state(m, Frozen), cfg, path)
  if tensor_edits:
    tensors = hf_gpt2.frozen_to_gpt2_tensors(nnx.to_pure_dict(nnx.state(m, Frozen)), cfg)
    for k, v in tensor_edits.items():
      if v is None:
        tensors.pop(k)
      else:
        tensors[k] = v
    save_file(tensors, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'})
  return out


def test_checkpoint_errors(tmp_path):
  cfg = _cfg()
  m = _random_model(cfg)
  d = _write_ckpt(tmp_path / 'shape', cfg, m, **{'transformer.h.1.mlp.c_fc.weight': np.zeros((32, 64), np.float32)})
  with pytest.raises(ValueError, match=r'transformer\.h\.1\.mlp\.c_fc\.weight has shape \(32, 64\), expected \(32, 128\)'):
    hf_gpt2.load_hf_gpt2(d, load_tokenizer=False)
  d = _write_ckpt(tmp_path / 'missing', cfg, m, **{'transformer.ln_f.bias': None})
  with pytest.raises(ValueError, match=r'transformer\.ln_f\.bias missing'):
    hf_gpt2.load_hf_gpt2(d, load_tokenizer=False)
  d = _write_ckpt(tmp_path / 'extra', cfg, m, **{'transformer.h.2.ln_1.weight': np.ones(32, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected tensor 'h\.2\.ln_1\.weight'"):
    hf_gpt2.load_hf_gpt2(d, load_tokenizer=False)
  d = _write_ckpt(tmp_path / 'head', cfg, m, **{'lm_head.weight': np.ones((VOCAB, 32), np.float32)})
  with pytest.raises(ValueError, match='lm_head.weight differs'):
    hf_gpt2.load_hf_gpt2(d, load_tokenizer=False)
  # Old checkpoints: no prefix, attention-mask buffers, an lm_head equal to wte: all fine.
  tensors = {k[len('transformer.'):]: v for k, v in hf_gpt2.frozen_to_gpt2_tensors(
      nnx.to_pure_dict(nnx.state(m, Frozen)), cfg).items()}
  tensors['h.0.attn.bias'] = np.tril(np.ones((1, 1, 24, 24), np.float32))
  tensors['lm_head.weight'] = tensors['wte.weight']
  d = _write_ckpt(tmp_path / 'old', cfg, m, **{k: None for k in hf_gpt2.frozen_to_gpt2_tensors(
      nnx.to_pure_dict(nnx.state(m, Frozen)), cfg)}, **tensors)
  assert hf_gpt2.load_hf_gpt2(d, load_tokenizer=False).config.width == 32

  d = _write_ckpt(tmp_path / 'nosafe', cfg, m)
  os.remove(os.path.join(d, 'model.safetensors'))
  open(os.path.join(d, 'pytorch_model.bin'), 'wb').close()
  with pytest.raises(FileNotFoundError, match=r'model\.safetensors not found.*pytorch_model\.bin'):
    hf_gpt2.load_hf_gpt2(d, load_tokenizer=False)
  d = _write_ckpt(tmp_path / 'llama', cfg, m)
  cfg_file = os.path.join(d, 'config.json')
  raw = json.load(open(cfg_file))
  json.dump({**raw, 'model_type': 'llama'}, open(cfg_file, 'w'))
  with pytest.raises(ValueError, match=r'config\.json: model_type is .llama., expected "gpt2"'):
    hf_gpt2.load_hf_gpt2(d, load_tokenizer=False)
  json.dump({**raw, 'activation_function': 'relu2'}, open(cfg_file, 'w'))
  with pytest.raises(ValueError, match="activation_function 'relu2' is not supported"):
    hf_gpt2.load_hf_gpt2(d, load_tokenizer=False)
  os.remove(cfg_file)
  with pytest.raises(FileNotFoundError, match=r'config\.json not found'):
    hf_gpt2.load_hf_gpt2(d, load_tokenizer=False)
  with pytest.raises(FileNotFoundError, match='checkpoint directory /no/such/dir not found'):
    hf_gpt2.load_hf_gpt2('/no/such/dir')
  no_tok = _write_ckpt(tmp_path / 'notok', cfg, m)
  with pytest.raises(ValueError, match='cannot load a Hugging Face tokenizer'):
    hf_gpt2.load_hf_gpt2(no_tok)   # no tokenizer files next to the weights


def test_hub_name_offline_names_the_model(tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))  # an empty cache
  with pytest.raises(OSError, match="Hugging Face model 'ml-ecs-test/no-such-gpt2'.*no network"):
    hf_gpt2.load_hf_gpt2('ml-ecs-test/no-such-gpt2', local_files_only=True)


# ----------------------------------------------------------------------------- PEFT, no torch


def test_peft_personalised_roundtrip_exact(tmp_path):
  cfg = _cfg()
  m = _random_model(cfg)
  _, parts = params.split_model(m)
  ids, mask = _ids()
  ref = _logits(m, ids, mask)
  out = peft_io.export_peft(_trainables(parts), parts['frozen'], cfg, tmp_path / 'adapter')
  conf = json.load(open(os.path.join(out, 'adapter_config.json')))
  assert (conf['peft_type'], conf['r'], conf['lora_alpha'], conf['fan_in_fan_out']) == ('LORA', 4, 8.0, True)
  assert conf['target_modules'] == ['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj']
  from safetensors.numpy import load_file
  t = load_file(os.path.join(out, 'adapter_model.safetensors'))
  assert len(t) == 2 * 4 * cfg.layers
  assert t['base_model.model.transformer.h.0.attn.c_attn.lora_A.weight'].shape == (4, 32)      # [2r, in]
  assert t['base_model.model.transformer.h.1.attn.c_attn.lora_B.weight'].shape == (96, 4)      # [out, 2r]
  assert t['base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight'].shape == (4, 128)
  # The adapter is the node's exact update: W + (alpha / R) A^T B^T == W + s (g_s A_s B_s + g_p A_p B_p).
  blk = m.blocks[1].mlp_in
  g = np.asarray(m.blocks[1].mix_gates())
  ours = blk.scale * (g[0] * blk.shared_a[...] @ blk.shared_b[...] + g[1] * blk.private_a[...] @ blk.private_b[...])
  theirs = (8.0 / 4) * t['base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight'].T @ \
      t['base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight'].T
  np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)

  fresh = DecoderLM(cfg, VOCAB, rngs=nnx.Rngs(11))
  g2, p2 = params.split_model(fresh)
  assert np.abs(_logits(fresh, ids, mask) - ref).max() > 1e-2
  _randomize(fresh, Gate, jax.random.key(12), 1.0)   # other gates: the import divides them out
  g2, p2 = params.split_model(fresh)
  new = peft_io.import_peft(out, _trainables(p2), cfg, which='personalised')
  back = params.merge_model(g2, {**new, 'frozen': parts['frozen']})
  diff = _maxdiff(_logits(back, ids, mask), ref, mask)
  print(f'PEFT personalised export -> import: max |dlogit| = {diff:.2e}')
  assert diff < 1e-5


def test_peft_shared_roundtrip_is_the_global_model(tmp_path):
  cfg = _cfg()
  m = _random_model(cfg)
  _, parts = params.split_model(m)
  out = peft_io.export_peft(_trainables(parts), None, cfg, tmp_path / 'shared', which='shared')
  conf = json.load(open(os.path.join(out, 'adapter_config.json')))
  assert (conf['r'], conf['lora_alpha']) == (2, 4.0)
  fresh = DecoderLM(cfg, VOCAB, rngs=nnx.Rngs(11))
  g2, p2 = params.split_model(fresh)
  new = peft_io.import_peft(out, _trainables(p2), cfg, which='shared')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               nnx.to_pure_dict(new['shared']), nnx.to_pure_dict(parts['shared']))
  back = params.merge_model(g2, {**new, 'frozen': parts['frozen']})
  # Reference: the node without its private adapter and with neutral gates.
  for blk in m.blocks:
    blk.gate[...] = jnp.zeros((2,))
    for t in ('qkv', 'attn_out', 'mlp_in', 'mlp_out'):
      getattr(blk, t).private_b[...] = jnp.zeros_like(getattr(blk, t).private_b[...])
  ids, mask = _ids()
  diff = _maxdiff(_logits(back, ids, mask), _logits(m, ids, mask), mask)
  print(f'PEFT shared export -> import: max |dlogit| = {diff:.2e}')
  assert diff < 1e-5


def test_peft_roundtrip_from_multimodal_node(tmp_path, tiny_config):
  from ml_ecs.models.multimodal import MultimodalLM
  shapes = {'accel': (32, 3), 'depth': (8,)}
  mk = lambda seed: MultimodalLM(shapes, {'accel': 'mlp', 'depth': 'mlp'}, tuple(shapes),
                                 tiny_config.edge_model, VOCAB, rngs=nnx.Rngs(seed))
  node = mk(0)
  _randomize(node, SharedLoRA, jax.random.key(1), 0.3)
  _randomize(node, PrivateLoRA, jax.random.key(2), 0.3)
  _randomize(node, Gate, jax.random.key(3), 1.0)
  _, parts = params.split_model(node)
  bcfg = tiny_config.edge_model.backbone
  out = peft_io.export_peft(_trainables(parts), parts['frozen'], bcfg, tmp_path / 'node')
  g2, p2 = params.split_model(mk(7))
  new = peft_io.import_peft(out, _trainables(p2), bcfg, which='personalised')
  # Only the backbone LoRA moved; the modality adapters of the shared part are untouched.
  other = lambda d: {k: v for k, v in nnx.to_pure_dict(d).items() if k != 'backbone'}
  jax.tree.map(np.testing.assert_array_equal, other(new['shared']), other(p2['shared']))
  back = params.merge_model(g2, {**new, 'frozen': parts['frozen']})
  ids, mask = _ids(t=8)
  diff = _maxdiff(_logits(back.backbone, ids, mask), _logits(node.backbone, ids, mask), mask)
  assert diff < 1e-5
  with pytest.raises(ValueError, match='client axis'):
    stacked = params.stack([_trainables(parts), _trainables(parts)])
    peft_io.export_peft(stacked, None, bcfg, tmp_path / 'stacked')


def _write_adapter(path, config, tensors):
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  json.dump(config, open(os.path.join(path, 'adapter_config.json'), 'w'))
  save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, os.path.join(path, 'adapter_model.safetensors'))
  return path


def test_peft_import_patterns_and_rslora(tmp_path):
  cfg = _cfg(lora_rank=4, lora_alpha=8.0)
  rng = np.random.RandomState(0)
  p = 'base_model.model.transformer.h.'
  tensors = {f'{p}0.attn.c_attn.lora_A.weight': rng.randn(2, 32), f'{p}0.attn.c_attn.lora_B.weight': rng.randn(96, 2),
             f'{p}1.mlp.c_fc.lora_A.weight': rng.randn(4, 32), f'{p}1.mlp.c_fc.lora_B.weight': rng.randn(128, 4)}
  for rslora in (False, True):
    conf = {'peft_type': 'LORA', 'r': 4, 'lora_alpha': 8, 'target_modules': ['c_attn', 'c_fc'],
            'rank_pattern': {'attn.c_attn': 2}, 'alpha_pattern': {'mlp.c_fc': 16}, 'use_rslora': rslora}
    d = _write_adapter(tmp_path / f'pat{rslora}', conf, tensors)
    m = DecoderLM(cfg, VOCAB, rngs=nnx.Rngs(0))
    _, parts = params.split_model(m)
    new = peft_io.import_peft(d, _trainables(parts), cfg)
    sh = nnx.to_pure_dict(new['shared'])['blocks']
    norm = np.sqrt if rslora else (lambda r: r)
    for (i, ours, hf, alpha, r) in ((0, 'qkv', 'attn.c_attn', 8, 2), (1, 'mlp_in', 'mlp.c_fc', 16, 4)):
      want = alpha / norm(r) * tensors[f'{p}{i}.{hf}.lora_A.weight'].T @ tensors[f'{p}{i}.{hf}.lora_B.weight'].T
      got = (8.0 / 4) * np.asarray(sh[i][ours]['shared_a']) @ np.asarray(sh[i][ours]['shared_b'])
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Modules the adapter does not cover carry no update.
    assert not np.asarray(sh[0]['mlp_in']['shared_b']).any() and not np.asarray(sh[1]['qkv']['shared_b']).any()


def test_peft_import_errors(tmp_path):
  cfg = _cfg()
  m = DecoderLM(cfg, VOCAB, rngs=nnx.Rngs(0))
  _, parts = params.split_model(m)
  tr = _trainables(parts)
  p = 'base_model.model.transformer.h.0.attn.c_attn.'
  good = {f'{p}lora_A.weight': np.ones((2, 32)), f'{p}lora_B.weight': np.ones((96, 2))}
  conf = {'peft_type': 'LORA', 'r': 2, 'lora_alpha': 4, 'target_modules': ['c_attn']}
  d = _write_adapter(tmp_path / 'r2', conf, good)
  with pytest.raises(ValueError, match=r'personalised import needs rank 2 \* lora_rank = 4'):
    peft_io.import_peft(d, tr, cfg, which='personalised')
  with pytest.raises(ValueError, match='which='):
    peft_io.import_peft(d, tr, cfg, which='both')
  with pytest.raises(ValueError, match=r'transformer\.h\.0\.attn\.c_attn.*LoRA on'):
    peft_io.import_peft(d, tr, _cfg(lora_targets=('mlp_in',)))
  with pytest.raises(ValueError, match=r'rank <= 2'):
    peft_io.import_peft(_write_adapter(tmp_path / 'r8', {**conf, 'r': 8}, {
        f'{p}lora_A.weight': np.ones((8, 32)), f'{p}lora_B.weight': np.ones((96, 8))}), tr, cfg)
  with pytest.raises(ValueError, match=r'rank 2, but adapter_config\.json says r = 3'):
    peft_io.import_peft(_write_adapter(tmp_path / 'r3', {**conf, 'r': 3}, good), tr, cfg)
  with pytest.raises(ValueError, match='peft_type is .PREFIX_TUNING., expected "LORA"'):
    peft_io.import_peft(_write_adapter(tmp_path / 'pt', {**conf, 'peft_type': 'PREFIX_TUNING'}, good), tr, cfg)
  with pytest.raises(ValueError, match='use_dora is true'):
    peft_io.import_peft(_write_adapter(tmp_path / 'dora', {**conf, 'use_dora': True}, good), tr, cfg)
  with pytest.raises(ValueError, match="tensor 'base_model.model.transformer.wte.lora_embedding_A'"):
    peft_io.import_peft(_write_adapter(tmp_path / 'emb', conf, {
        **good, 'base_model.model.transformer.wte.lora_embedding_A': np.ones((2, VOCAB))}), tr, cfg)
  with pytest.raises(ValueError, match='needs both lora_A and lora_B'):
    peft_io.import_peft(_write_adapter(tmp_path / 'half', conf, {f'{p}lora_A.weight': np.ones((2, 32))}), tr, cfg)
  os.remove(os.path.join(d, 'adapter_model.safetensors'))
  with pytest.raises(FileNotFoundError, match=r'adapter_model\.safetensors not found'):
    peft_io.import_peft(d, tr, cfg)
  with pytest.raises(FileNotFoundError, match=r'adapter_config\.json not found'):
    peft_io.import_peft(tmp_path / 'none', tr, cfg)


# ----------------------------------------------------------------------------- parity with transformers / PEFT


def _check_fixture(root: str) -> dict[str, float]:
  """Our logits against the reference logits of a fixture directory; returns max |delta| per case."""
  ref = np.load(os.path.join(root, 'reference.npz'))
  ids, mask = ref['input_ids'], ref['attention_mask']
  out = {}
  bb = hf_gpt2.load_hf_gpt2(os.path.join(root, 'base'), lora_rank=4, lora_alpha=8.0)
  # Tokenizer: same ids as transformers' own tokenizer.
  texts = json.load(open(os.path.join(root, 'versions.json')))['texts']
  enc, emask = bb.tokenizer.encode(texts, 40, add_eos=False)
  want = np.split(ref['text_ids_flat'], np.cumsum(ref['text_ids_len'])[:-1])
  for row, m, w in zip(enc, emask, want):
    np.testing.assert_array_equal(row[m > 0], w)
  assert bb.tokenizer.decode(enc) == texts
  model = bb.model()
  out['base'] = _maxdiff(_logits(model, ids, mask), ref['logits_base'], mask)
  var = hf_gpt2.load_hf_gpt2(os.path.join(root, 'variant'), lora_rank=4, lora_alpha=8.0)
  assert (var.config.activation, var.config.ln_eps, var.config.mlp_dim) == ('gelu', 1e-6, 48)
  assert var.config.scale_attn_by_inverse_layer_idx
  out['variant'] = _maxdiff(_logits(var.model(), ids, mask), ref['logits_variant'], mask)
  g, parts = params.split_model(model)
  for name in ('adapter', 'adapter_patterns'):
    new = peft_io.import_peft(os.path.join(root, name), _trainables(parts), bb.config, which='shared')
    m = params.merge_model(g, {**new, 'frozen': parts['frozen']})
    out[name] = _maxdiff(_logits(m, ids, mask), ref[f'logits_{name}'], mask)
  print('max |dlogit| vs transformers/PEFT:', {k: f'{v:.2e}' for k, v in out.items()})
  for k, v in out.items():
    assert v < ATOL, (k, v)
  return out


@pytest.mark.skipif(not os.path.isfile(os.path.join(FIXTURE, 'reference.npz')),
                    reason='tests/fixtures/hf_gpt2 missing: run `python tests/fixtures/make_hf_fixture.py` '
                           'where torch, transformers and peft are installed')
def test_parity_with_transformers_fixture():
  _check_fixture(FIXTURE)


def _has_torch_stack() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ('torch', 'transformers', 'peft'))


@pytest.mark.skipif(not _has_torch_stack(), reason='live parity needs torch, transformers and peft')
def test_live_parity_fixture_rebuilt(tmp_path):
  sys.path.insert(0, FIXTURES)
  try:
    import make_hf_fixture
  finally:
    sys.path.remove(FIXTURES)
  make_hf_fixture.main(str(tmp_path / 'hf_gpt2'))
  _check_fixture(str(tmp_path / 'hf_gpt2'))


@pytest.mark.skipif(not _has_torch_stack(), reason='live export check needs torch, transformers and peft')
@pytest.mark.parametrize('which', ['personalised', 'shared'])
def test_live_our_exports_load_in_transformers_and_peft(tmp_path, which):
  import torch
  from peft import PeftModel
  from transformers import GPT2LMHeadModel
  cfg = _cfg(**VARIANT)
  tok = TextTokenizer.train(['the person is walking', 'a fall to the floor'], vocab_size=VOCAB + 200)
  m = _random_model(cfg, vocab=tok.vocab_size)
  _, parts = params.split_model(m)
  base_dir = hf_gpt2.export_hf_gpt2(parts['frozen'], cfg, tmp_path / 'base', tokenizer=tok)
  ad_dir = peft_io.export_peft(_trainables(parts), parts['frozen'], cfg, tmp_path / 'adapter', which=which,
                               base_model_name_or_path=str(base_dir))
  ids, mask = _ids(tok.vocab_size)
  model = GPT2LMHeadModel.from_pretrained(base_dir).eval()
  with torch.no_grad():
    plain = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  frozen_only = DecoderLM(cfg, tok.vocab_size, rngs=nnx.Rngs(3))
  nnx.update(frozen_only, nnx.state(m, Frozen))
  d_base = _maxdiff(plain, _logits(frozen_only, ids, mask), mask)
  peft_model = PeftModel.from_pretrained(model, ad_dir).eval()
  with torch.no_grad():
    adapted = peft_model(input_ids=torch.tensor(ids),
                         attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  if which == 'shared':
    for blk in m.blocks:
      blk.gate[...] = jnp.zeros((2,))
      for t in ('qkv', 'attn_out', 'mlp_in', 'mlp_out'):
        getattr(blk, t).private_b[...] = jnp.zeros_like(getattr(blk, t).private_b[...])
  d_ad = _maxdiff(adapted, _logits(m, ids, mask), mask)
  print(f'our export in transformers/PEFT ({which}): base {d_base:.2e}, with adapter {d_ad:.2e}')
  assert d_base < ATOL and d_ad < ATOL
  assert np.abs(adapted - plain)[mask > 0].max() > 1e-2
