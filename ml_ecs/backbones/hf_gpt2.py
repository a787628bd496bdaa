"""Hugging Face GPT-2-family checkpoints in and out of our `DecoderLM`.

A GPT-2 checkpoint (``config.json`` + ``model.safetensors`` + tokenizer files)
maps one to one onto `DecoderLM`'s frozen weights:

==============================  =====================================
GPT-2 (``transformer.`` prefix)   DecoderLM frozen pure dict
==============================  =====================================
``wte.weight`` [V, d]           ``wte`` (tied output head)
``wpe.weight`` [n_positions, d] ``wpe``
``h.{i}.ln_1.weight/bias``      ``blocks/{i}/ln1/scale, bias``
``h.{i}.attn.c_attn``           ``blocks/{i}/qkv/kernel, bias``
``h.{i}.attn.c_proj``           ``blocks/{i}/attn_out/...``
``h.{i}.ln_2``                  ``blocks/{i}/ln2/...``
``h.{i}.mlp.c_fc``              ``blocks/{i}/mlp_in/...``
``h.{i}.mlp.c_proj``            ``blocks/{i}/mlp_out/...``
``ln_f.weight/bias``            ``ln_f/scale, bias``
==============================  =====================================

GPT-2's ``Conv1D`` stores weights as [in, out], which is our kernel layout, so
no transpose is needed. The config is read with ``transformers.AutoConfig`` and
the weights with ``safetensors.numpy`` (no torch). `export_hf_gpt2` writes the
inverse, loadable by ``transformers.GPT2LMHeadModel.from_pretrained``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ml_ecs.models.decoder import ACTIVATIONS, LORA_TARGETS, DecoderLM, mlp_dim
from ml_ecs.models.variables import Frozen
from ml_ecs.data.tokenizer import EOS, PAD, HFTokenizer, TextTokenizer

# Our LoRALinear name -> GPT-2 module name inside block h.{i}.
HF_MODULES = {'qkv': 'attn.c_attn', 'attn_out': 'attn.c_proj',
              'mlp_in': 'mlp.c_fc', 'mlp_out': 'mlp.c_proj'}
_LN = {'ln1': 'ln_1', 'ln2': 'ln_2'}
# Non-parameter buffers that older checkpoints store in the attention module.
_BUFFERS = ('attn.bias', 'attn.masked_bias')
# Files fetched from the hub for a model name.
_HUB_FILES = ['config.json', 'model.safetensors', 'model.safetensors.index.json', 'model-*.safetensors',
              'tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'merges.txt',
              'special_tokens_map.json', 'added_tokens.json', 'generation_config.json']
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
WEIGHTS_INDEX_FILE = 'model.safetensors.index.json'


@dataclasses.dataclass
class HFBackbone:
  """An imported GPT-2-family checkpoint, ready for `DecoderLM`.

  config: backbone config for `DecoderLM` (width, layers, heads, mlp_ratio /
    mlp_dim, max_len = n_positions, lora_*, activation, ln_eps, attention scaling).
  frozen: pure dict equal in structure to ``nnx.to_pure_dict(nnx.state(DecoderLM, Frozen))``.
  tokenizer: the checkpoint's tokenizer with TextTokenizer's interface (None if not loaded).
  vocab_size: rows of the embedding table (= DecoderLM's vocab_size).
  hf_config: the transformers GPT2Config read from config.json.
  path: the local checkpoint directory.
  """
  config: ml_collections.ConfigDict
  frozen: dict[str, Any]
  tokenizer: HFTokenizer | None
  vocab_size: int
  hf_config: Any
  path: str

  def model(self, seed: int = 0) -> DecoderLM:
    """A DecoderLM with these frozen weights (fresh LoRA: B = 0, gates 1)."""
    model = DecoderLM(self.config, self.vocab_size, rngs=nnx.Rngs(seed))
    set_frozen(model, self.frozen)
    return model


def set_frozen(model: DecoderLM, frozen: dict[str, Any]) -> None:
  """Writes a frozen pure dict (as in HFBackbone.frozen) into `model`'s Frozen variables."""
  state = nnx.state(model, Frozen)
  want = nnx.to_pure_dict(state)
  _check_same_shapes(frozen, want, 'frozen weights')
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, frozen))
  nnx.update(model, state)


def _check_same_shapes(got: dict, want: dict, what: str, path: str = '') -> None:
  if set(got) != set(want):
    raise ValueError(f'{what}: keys at {path or "/"} are {sorted(map(str, got))}, expected {sorted(map(str, want))}')
  for k in want:
    p = f'{path}/{k}'
    if isinstance(want[k], dict):
      if not isinstance(got[k], dict):
        raise ValueError(f'{what}: {p} is an array, expected a dict')
      _check_same_shapes(got[k], want[k], what, p)
    elif tuple(np.shape(got[k])) != tuple(np.shape(want[k])):
      raise ValueError(f'{what}: {p} has shape {tuple(np.shape(got[k]))}, expected {tuple(np.shape(want[k]))}')


# ----------------------------------------------------------------------------- config


def resolve_checkpoint(name_or_dir: str | os.PathLike, *, local_files_only: bool = False,
                       revision: str | None = None) -> str:
  """Local directory of a checkpoint: `name_or_dir` itself, or the hub snapshot of a model name.

  A hub name (e.g. ``'openai-community/gpt2'``) only resolves where the hub is
  reachable or the files are already in the local Hugging Face cache.
  """
  path = os.fspath(name_or_dir)
  if os.path.isdir(path):
    return path
  if path.startswith(('/', './', '../', '~')) or os.path.exists(path):
    raise FileNotFoundError(f'GPT-2 checkpoint directory {path} not found (expected a directory with '
                            f'{CONFIG_FILE} and {WEIGHTS_FILE})')
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id=path, revision=revision, allow_patterns=_HUB_FILES,
                             local_files_only=local_files_only)
  except Exception as e:  # offline, unknown repo, invalid name: all end here
    raise OSError(f'cannot get Hugging Face model {path!r}: it is not a local directory, and it could not be '
                  f'fetched from the hub or found in the local cache (no network here?). Download it where '
                  f'a network is available and pass its directory. Cause: {type(e).__name__}: {e}') from e


def read_gpt2_config(path: str | os.PathLike):
  """transformers GPT2Config of checkpoint directory `path`, checked for what DecoderLM implements."""
  cfg_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f'{cfg_file} not found: a GPT-2 checkpoint directory needs {CONFIG_FILE}')
  with open(cfg_file) as f:
    raw = json.load(f)
  if raw.get('model_type') != 'gpt2':
    raise ValueError(f'{cfg_file}: model_type is {raw.get("model_type")!r}, expected "gpt2" (only the GPT-2 '
                     f'architecture is supported; architectures={raw.get("architectures")})')
  from transformers import AutoConfig
  hf = AutoConfig.from_pretrained(os.fspath(path), local_files_only=True)
  if getattr(hf, 'add_cross_attention', False):
    raise ValueError(f'{cfg_file}: add_cross_attention is true; DecoderLM has no cross-attention')
  if hf.n_embd % hf.n_head:
    raise ValueError(f'{cfg_file}: n_embd {hf.n_embd} is not a multiple of n_head {hf.n_head}')
  if hf.activation_function not in ACTIVATIONS:
    raise ValueError(f'{cfg_file}: activation_function {hf.activation_function!r} is not supported; '
                     f'expected one of {sorted(ACTIVATIONS)}')
  return hf


def backbone_config_from_hf(hf, lora_rank: int = 4, lora_alpha: float = 8.0,
                            lora_targets: tuple[str, ...] = LORA_TARGETS) -> ml_collections.ConfigDict:
  """DecoderLM backbone config of a transformers GPT2Config plus our LoRA settings."""
  bad = [t for t in lora_targets if t not in LORA_TARGETS]
  if bad:
    raise ValueError(f'lora_targets {bad} unknown; expected a subset of {LORA_TARGETS}')
  d = int(hf.n_embd)
  inner = int(hf.n_inner) if hf.n_inner is not None else 4 * d
  fields = dict(width=d, layers=int(hf.n_layer), heads=int(hf.n_head), mlp_ratio=max(inner // d, 1),
                max_len=int(hf.n_positions), lora_rank=int(lora_rank), lora_alpha=float(lora_alpha),
                lora_targets=tuple(lora_targets), activation=str(hf.activation_function),
                ln_eps=float(hf.layer_norm_epsilon), scale_attn_weights=bool(hf.scale_attn_weights),
                scale_attn_by_inverse_layer_idx=bool(hf.scale_attn_by_inverse_layer_idx))
  if inner % d:
    fields['mlp_dim'] = inner
  return ml_collections.ConfigDict(fields)


def hf_config_from_backbone(cfg: ml_collections.ConfigDict, vocab_size: int, eos_id: int | None = None,
                            pad_id: int | None = None):
  """transformers GPT2Config describing DecoderLM backbone config `cfg` (inverse of backbone_config_from_hf)."""
  from transformers import GPT2Config
  inner = mlp_dim(cfg)
  return GPT2Config(
      vocab_size=int(vocab_size), n_positions=int(cfg.max_len), n_embd=int(cfg.width), n_layer=int(cfg.layers),
      n_head=int(cfg.heads), n_inner=None if inner == 4 * cfg.width else inner,
      activation_function=cfg.get('activation', 'gelu_new'), layer_norm_epsilon=float(cfg.get('ln_eps', 1e-5)),
      scale_attn_weights=bool(cfg.get('scale_attn_weights', True)),
      scale_attn_by_inverse_layer_idx=bool(cfg.get('scale_attn_by_inverse_layer_idx', False)),
      tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
      architectures=['GPT2LMHeadModel'])


# ----------------------------------------------------------------------------- weights


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory (model.safetensors or a sharded index), as numpy."""
  from safetensors.numpy import load_file
  single = os.path.join(path, WEIGHTS_FILE)
  index = os.path.join(path, WEIGHTS_INDEX_FILE)
  if os.path.isfile(single):
    return load_file(single)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
    out: dict[str, np.ndarray] = {}
    for name in files:
      shard = os.path.join(path, name)
      if not os.path.isfile(shard):
        raise FileNotFoundError(f'{shard} (listed in {index}) not found')
      out.update(load_file(shard))
    return out
  other = [f for f in ('pytorch_model.bin', 'tf_model.h5', 'flax_model.msgpack') if os.path.exists(os.path.join(path, f))]
  hint = f' (found {other}: convert it to safetensors where torch is installed)' if other else ''
  raise FileNotFoundError(f'{single} not found: expected the weights as safetensors{hint}')


def gpt2_tensors_to_frozen(tensors: dict[str, np.ndarray], cfg: ml_collections.ConfigDict,
                           vocab_size: int, dtype: Any = np.float32, source: str = 'checkpoint') -> dict[str, Any]:
  """DecoderLM frozen pure dict of GPT-2 state-dict tensors (names with or without 'transformer.')."""
  t = {k[len('transformer.'):] if k.startswith('transformer.') else k: v for k, v in tensors.items()}
  d, hid = cfg.width, mlp_dim(cfg)
  used: set[str] = set()

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in t:
      raise ValueError(f'{source}: tensor transformer.{name} missing (expected shape {shape})')
    x = t[name]
    if tuple(x.shape) != shape:
      raise ValueError(f'{source}: tensor transformer.{name} has shape {tuple(x.shape)}, expected {shape}')
    used.add(name)
    return np.asarray(x, dtype)

  frozen: dict[str, Any] = {
      'wte': get('wte.weight', (vocab_size, d)),
      'wpe': get('wpe.weight', (cfg.max_len, d)),
      'ln_f': {'scale': get('ln_f.weight', (d,)), 'bias': get('ln_f.bias', (d,))},
      'blocks': {}}
  shapes = {'qkv': (d, 3 * d), 'attn_out': (d, d), 'mlp_in': (d, hid), 'mlp_out': (hid, d)}
  for i in range(cfg.layers):
    blk: dict[str, Any] = {}
    for ours, theirs in _LN.items():
      blk[ours] = {'scale': get(f'h.{i}.{theirs}.weight', (d,)), 'bias': get(f'h.{i}.{theirs}.bias', (d,))}
    for ours, theirs in HF_MODULES.items():
      din, dout = shapes[ours]
      blk[ours] = {'kernel': get(f'h.{i}.{theirs}.weight', (din, dout)), 'bias': get(f'h.{i}.{theirs}.bias', (dout,))}
    frozen['blocks'][i] = blk
  for k in list(t):
    if k in used or any(k == f'h.{i}.{b}' for i in range(cfg.layers) for b in _BUFFERS):
      continue
    if k == 'lm_head.weight':
      if t[k].shape == frozen['wte'].shape and np.array_equal(np.asarray(t[k], dtype), frozen['wte']):
        continue
      raise ValueError(f'{source}: lm_head.weight differs from transformer.wte.weight; DecoderLM ties the output '
                       'head to the input embedding (tie_word_embeddings=true)')
    raise ValueError(f'{source}: unexpected tensor {k!r} (shape {tuple(t[k].shape)}) for a GPT-2 with '
                     f'{cfg.layers} layers')
  return frozen


def frozen_to_gpt2_tensors(frozen: dict[str, Any], cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """GPT-2 state-dict tensors ('transformer.'-prefixed) of a DecoderLM frozen pure dict."""
  f = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  out = {'transformer.wte.weight': f(frozen['wte']), 'transformer.wpe.weight': f(frozen['wpe']),
         'transformer.ln_f.weight': f(frozen['ln_f']['scale']), 'transformer.ln_f.bias': f(frozen['ln_f']['bias'])}
  for i in range(cfg.layers):
    blk = frozen['blocks'][i]
    for ours, theirs in _LN.items():
      out[f'transformer.h.{i}.{theirs}.weight'] = f(blk[ours]['scale'])
      out[f'transformer.h.{i}.{theirs}.bias'] = f(blk[ours]['bias'])
    for ours, theirs in HF_MODULES.items():
      out[f'transformer.h.{i}.{theirs}.weight'] = f(blk[ours]['kernel'])
      out[f'transformer.h.{i}.{theirs}.bias'] = f(blk[ours]['bias'])
  return out


def _as_pure(frozen: Any) -> dict[str, Any]:
  """Pure dict of a frozen nnx.State or pure dict; a MultimodalLM's state is narrowed to 'backbone'."""
  pure = nnx.to_pure_dict(frozen) if isinstance(frozen, nnx.State) else frozen
  if 'blocks' not in pure and 'backbone' in pure:
    pure = pure['backbone']
  if 'blocks' not in pure:
    raise ValueError(f'frozen weights: no backbone blocks found (top-level keys {sorted(map(str, pure))})')
  return pure


# ----------------------------------------------------------------------------- public API


def load_hf_gpt2(name_or_dir: str | os.PathLike, lora_rank: int = 4, lora_alpha: float = 8.0,
                 lora_targets: tuple[str, ...] = LORA_TARGETS, *, load_tokenizer: bool = True,
                 local_files_only: bool = False, revision: str | None = None,
                 dtype: Any = np.float32) -> HFBackbone:
  """Imports a GPT-2-family checkpoint (a local directory or a hub model name) for DecoderLM.

  Reads config.json through transformers' AutoConfig, the weights from
  model.safetensors (or a sharded index) with safetensors.numpy, and the
  tokenizer with transformers' AutoTokenizer (wrapped as HFTokenizer).
  """
  path = resolve_checkpoint(name_or_dir, local_files_only=local_files_only, revision=revision)
  hf = read_gpt2_config(path)
  cfg = backbone_config_from_hf(hf, lora_rank, lora_alpha, lora_targets)
  tensors = read_safetensors(path)
  vocab = int(hf.vocab_size)
  frozen = gpt2_tensors_to_frozen(tensors, cfg, vocab, dtype, source=os.path.join(path, WEIGHTS_FILE))
  if not hf.tie_word_embeddings and 'lm_head.weight' not in tensors:
    raise ValueError(f'{os.path.join(path, CONFIG_FILE)}: tie_word_embeddings is false but no lm_head.weight '
                     'is stored; DecoderLM needs a tied head')
  tok = HFTokenizer.from_pretrained(path, vocab_size=vocab) if load_tokenizer else None
  return HFBackbone(cfg, frozen, tok, vocab, hf, path)


def hf_tokenizer_of(tokenizer: TextTokenizer | HFTokenizer, vocab_size: int | None = None) -> HFTokenizer:
  """HFTokenizer of either of our tokenizers (our BPE is wrapped as PreTrainedTokenizerFast)."""
  if isinstance(tokenizer, HFTokenizer):
    return tokenizer
  from transformers import PreTrainedTokenizerFast
  fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok, eos_token=EOS, pad_token=PAD)
  return HFTokenizer(fast, vocab_size)


def export_hf_gpt2(frozen: Any, backbone_cfg: ml_collections.ConfigDict, out_dir: str | os.PathLike,
                   tokenizer: TextTokenizer | HFTokenizer | None = None) -> str:
  """Writes DecoderLM frozen weights as a GPT-2 checkpoint directory (config.json,
  model.safetensors and, if given, the tokenizer files); returns the directory.

  frozen: pure dict or nnx.State of the Frozen part of a DecoderLM (or of a
  MultimodalLM, whose 'backbone' is taken). LoRA is not merged: the base model
  is exported as is (see `ml_ecs.backbones.peft_io` for the adapters).
  """
  from safetensors.numpy import save_file
  pure = _as_pure(frozen)
  vocab = int(np.shape(pure['wte'])[0])
  os.makedirs(out_dir, exist_ok=True)
  tensors = frozen_to_gpt2_tensors(pure, backbone_cfg)
  gpt2_tensors_to_frozen(tensors, backbone_cfg, vocab, source='export')  # validates every shape
  hf_tok = None if tokenizer is None else hf_tokenizer_of(tokenizer, vocab)
  hf = hf_config_from_backbone(backbone_cfg, vocab, None if hf_tok is None else hf_tok.eos_id,
                               None if hf_tok is None or hf_tok.pad_id == hf_tok.eos_id else hf_tok.pad_id)
  hf.save_pretrained(os.fspath(out_dir))
  save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={'format': 'pt'})
  if hf_tok is not None:
    hf_tok.save(out_dir)
  return os.fspath(out_dir)
