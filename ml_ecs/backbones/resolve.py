"""The frozen backbones of a federation: our own pretrained decoders, or Hugging Face GPT-2 checkpoints.

`edge_model.backbone.hf` / `server_model.backbone.hf` ('' = ours) name a hub model
(e.g. ``'distilgpt2'``, ``'gpt2-medium'``) or a local checkpoint directory
(config.json + model.safetensors + tokenizer files, see `ml_ecs.backbones.hf_gpt2`).

Rules:

- **Architecture: the checkpoint wins.** With ``hf`` set, width, layers, heads,
  mlp_ratio / mlp_dim, max_len (= n_positions), activation, ln_eps and the attention
  scaling come from the checkpoint's config.json; the config's values of these
  fields are ignored (init logs each one that differs). The LoRA fields
  (lora_rank, lora_alpha, lora_targets) stay the config's. The resolved backbone
  is recorded in model_summary.json.
- **No pretraining** for an HF backbone: its weights are read once (once per
  distinct checkpoint, when edge and server name the same one), are not copied
  into the backbone cache, and are put on the devices once, shared by every client.
- **One tokenizer.** The task text is tokenised with the HF checkpoint's tokenizer.
  If both backbones are HF, their tokenizers must have the same vocabulary (token ->
  id map and end-of-text id; the GPT-2 family shares one). If only one is HF, our
  other backbone is built and pretrained on that tokenizer (`text.vocab_size` is then
  unused). Anything else is an error naming both checkpoints.
- ``max_len``: prompt_len + text.instr_len + text.answer_len must fit the
  checkpoint's n_positions (checked here, as `validate` cannot read the checkpoint).
- ``random:NAME`` (NAME a known GPT-2 checkpoint, `KNOWN_GPT2`): that architecture with random
  weights (seeded by the training seed), our own tokenizer and the checkpoint's embedding rows;
  nothing is read and no Hugging Face package is needed. For realistic time, memory and
  communication where no checkpoint is at hand (init logs that its answers mean nothing).
"""
from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from ml_ecs.errors import ConfigError

MODELS = ('edge_model', 'server_model')
# Backbone fields that a checkpoint's config.json decides (see the module docstring).
ARCH_FIELDS = ('width', 'layers', 'heads', 'mlp_ratio', 'mlp_dim', 'max_len', 'activation', 'ln_eps',
               'scale_attn_weights', 'scale_attn_by_inverse_layer_idx')
_GPT2_COMMON = dict(model_type='gpt2', vocab_size=50257, n_positions=1024, n_inner=None,
                    activation_function='gelu_new', layer_norm_epsilon=1e-5, scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, tie_word_embeddings=True)
# config.json of the public GPT-2 checkpoints, to size a config (`ml_ecs.run.sizing`) where
# the checkpoint is not at hand (no hub access). Loading a backbone always reads the real file.
KNOWN_GPT2 = {
    name: {**_GPT2_COMMON, **arch}
    for names, arch in [
        (('gpt2', 'openai-community/gpt2'), dict(n_embd=768, n_layer=12, n_head=12)),
        (('distilgpt2', 'distilbert/distilgpt2'), dict(n_embd=768, n_layer=6, n_head=12)),
        (('gpt2-medium', 'openai-community/gpt2-medium'), dict(n_embd=1024, n_layer=24, n_head=16)),
        (('gpt2-large', 'openai-community/gpt2-large'), dict(n_embd=1280, n_layer=36, n_head=20)),
        (('gpt2-xl', 'openai-community/gpt2-xl'), dict(n_embd=1600, n_layer=48, n_head=25)),
    ]
    for name in names}


# backbone.hf = 'random:NAME': the architecture of known GPT-2 checkpoint NAME (KNOWN_GPT2) with random weights and
# our own tokenizer (embedding rows as the checkpoint's): realistic sizes for time, memory and communication where no
# checkpoint can be read; its answers mean nothing. No Hugging Face packages needed.
RANDOM = 'random:'


def hf_name(mcfg: ml_collections.ConfigDict) -> str:
  """The `backbone.hf` of a model config ('' = our own pretrained backbone)."""
  return str(mcfg.backbone.get('hf', '') or '')


@dataclasses.dataclass(frozen=True)
class Backbones:
  """Resolved backbones of a config.

  models: model name -> model config whose `backbone` is the resolved one.
  sources: model name -> 'pretrained' or the HF name / directory.
  tokenizer: the HF tokenizer the task text must use (None: our BPE).
  vocab_sizes: model name -> embedding rows of HF backbones (ours: the text tokenizer's size).
  weights: HF checkpoint name -> frozen pure dict (numpy); empty when only configs were read.
  overrides: model name -> {field: (config value, checkpoint value)} that the checkpoint changed.
  """
  models: dict[str, ml_collections.ConfigDict]
  sources: dict[str, str]
  tokenizer: Any
  vocab_sizes: dict[str, int]
  weights: dict[str, dict]
  overrides: dict[str, dict[str, tuple[Any, Any]]]

  @property
  def tokenizer_id(self) -> str:
    """'' (our BPE) or the HF checkpoint whose tokenizer the text uses (a pretraining cache key)."""
    return next((s for s in self.sources.values() if s != 'pretrained' and not s.startswith(RANDOM)), '') \
        if self.tokenizer is not None else ''

  def vocab_size(self, name: str, text_vocab_size: int) -> int:
    return self.vocab_sizes.get(name, text_vocab_size)

  def describe(self) -> dict[str, Any]:
    """{model: {'source', 'backbone'}} for model_summary.json."""
    return {n: {'source': self.sources[n], 'backbone': self.models[n].backbone.to_dict()} for n in MODELS}


def _hf_module():
  try:
    from ml_ecs.backbones import hf_gpt2
    import transformers  # noqa: F401
    import safetensors  # noqa: F401
  except ImportError as e:
    raise ConfigError(f"backbone.hf is set but the Hugging Face extra is missing ({e}): "
                      "pip install 'ml-ecs[hf]'") from None
  return hf_gpt2


def _hf_config_only(name: str):
  """transformers GPT2Config of checkpoint `name` without reading weights: a local directory,
  the local Hugging Face cache, or KNOWN_GPT2. Returns (config, where it came from)."""
  hf_gpt2 = _hf_module()
  if os.path.isdir(name):
    return hf_gpt2.read_gpt2_config(name), os.path.join(name, hf_gpt2.CONFIG_FILE)
  try:
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(name, hf_gpt2.CONFIG_FILE)
  except Exception:  # noqa: BLE001  (invalid repo id etc.: fall through to the table)
    cached = None
  if isinstance(cached, str) and os.path.isfile(cached):
    return hf_gpt2.read_gpt2_config(os.path.dirname(cached)), cached
  if name in KNOWN_GPT2:
    from transformers import GPT2Config
    return GPT2Config(**KNOWN_GPT2[name]), f'built-in GPT-2 table ({name} not available locally)'
  raise ConfigError(f'backbone.hf = {name!r}: not a local directory, not in the local Hugging Face cache and '
                    f'not one of the known GPT-2 checkpoints {sorted(KNOWN_GPT2)}')


def _resolve_model(name: str, mcfg: ml_collections.ConfigDict, hf_config, hf: str
                   ) -> tuple[ml_collections.ConfigDict, dict[str, tuple[Any, Any]]]:
  """(model config with the checkpoint's backbone architecture, {field: (ours, checkpoint's)} that differ)."""
  from ml_ecs.backbones import hf_gpt2   # reads the config's fields only: no Hugging Face package needed
  b = mcfg.backbone
  try:
    resolved = hf_gpt2.backbone_config_from_hf(hf_config, b.lora_rank, b.lora_alpha, tuple(b.lora_targets))
  except ValueError as e:
    raise ConfigError(f'{name}.backbone: {e}') from None
  resolved.hf = hf
  overrides = {}
  for f in ARCH_FIELDS:
    ours, theirs = b.get(f, None), resolved.get(f, None)
    if f == 'mlp_dim' and not ours and not theirs:
      continue
    if ours is not None and ours != theirs:
      overrides[f] = (ours, theirs)
  out = ml_collections.ConfigDict(mcfg.to_dict())
  out.backbone = resolved
  return out, overrides


def _check_fits(cfg: ml_collections.ConfigDict, name: str, mcfg: ml_collections.ConfigDict, hf: str) -> None:
  need = mcfg.prompt_len + cfg.text.instr_len + cfg.text.answer_len
  if need > mcfg.backbone.max_len:
    raise ConfigError(f'{name}.backbone.hf = {hf!r} has n_positions = {mcfg.backbone.max_len}, fewer than '
                      f'{name}.prompt_len + text.instr_len + text.answer_len = {need}')


def _same_vocabulary(a, b) -> bool:
  return a.eos_id == b.eos_id and len(a.tok) == len(b.tok) and a.tok.get_vocab() == b.tok.get_vocab()


def resolve(cfg: ml_collections.ConfigDict, *, load_weights: bool = True,
            log: Callable[[str], None] = print) -> Backbones:
  """Resolves both backbones of `cfg`.

  load_weights=True (init): every distinct HF checkpoint is read once (weights and
  tokenizer) and the tokenizer rule is checked. False (sizing): only config.json is
  read (or KNOWN_GPT2 is used), nothing else.
  """
  models, sources, vocab, overrides, weights, toks = {}, {}, {}, {}, {}, {}
  loaded: dict[str, Any] = {}
  for name in MODELS:
    mcfg, hf = cfg[name], hf_name(cfg[name])
    if not hf:
      models[name], sources[name] = ml_collections.ConfigDict(mcfg.to_dict()), 'pretrained'
      continue
    if hf.startswith(RANDOM):
      arch = hf[len(RANDOM):]
      if arch not in KNOWN_GPT2:
        raise ConfigError(f'{name}.backbone.hf = {hf!r}: expected random:NAME with NAME one of {sorted(KNOWN_GPT2)}')
      hf_config = types.SimpleNamespace(**KNOWN_GPT2[arch])
      models[name], overrides[name] = _resolve_model(name, mcfg, hf_config, hf)
      sources[name], vocab[name] = hf, int(hf_config.vocab_size)
      _check_fits(cfg, name, models[name], hf)
      log(f'{name}.backbone: the architecture of {arch} with RANDOM weights (no checkpoint is read): for time, '
          'memory and communication only; its answers mean nothing')
      continue
    hf_gpt2 = _hf_module()
    if load_weights:
      if hf not in loaded:
        try:
          loaded[hf] = hf_gpt2.load_hf_gpt2(hf, lora_targets=tuple(mcfg.backbone.lora_targets))
        except (OSError, ValueError) as e:
          raise ConfigError(f'{name}.backbone.hf = {hf!r}: {e}') from None
        weights[hf] = loaded[hf].frozen
      hf_config, toks[name] = loaded[hf].hf_config, loaded[hf].tokenizer
      where = loaded[hf].path
    else:
      hf_config, where = _hf_config_only(hf)
    models[name], overrides[name] = _resolve_model(name, mcfg, hf_config, hf)
    sources[name], vocab[name] = hf, int(hf_config.vocab_size)
    _check_fits(cfg, name, models[name], hf)
    if overrides[name]:
      log(f'{name}.backbone from {where}: ' + ', '.join(
          f'{f} {a!r} -> {b!r}' for f, (a, b) in overrides[name].items()) + ' (the checkpoint decides)')
  tokenizer = None
  if toks:
    (n0, t0), *rest = toks.items()
    for n1, t1 in rest:
      if not _same_vocabulary(t0, t1):
        raise ConfigError(
            f'{n0}.backbone.hf = {sources[n0]!r} and {n1}.backbone.hf = {sources[n1]!r} have different '
            f'tokenizers ({len(t0.tok)} vs {len(t1.tok)} tokens, end-of-text ids {t0.eos_id} vs {t1.eos_id}, or '
            'different token ids): edge and server must share one vocabulary (e.g. both GPT-2 family)')
    for n, v in vocab.items():
      if len(t0.tok) > v:
        raise ConfigError(f'the tokenizer of {sources[n0]!r} has {len(t0.tok)} tokens, more than the '
                          f'{v} embedding rows of {n}.backbone.hf = {sources[n]!r}')
    tokenizer = t0
    for n in MODELS:
      vocab.setdefault(n, tokenizer.vocab_size)  # our backbone, built on the HF tokenizer
  return Backbones(models, sources, tokenizer, vocab, weights, overrides)


def frozen_state(bb: Backbones, name: str, template: nnx.State, sharding: jax.sharding.Sharding,
                 placed: dict[str, Any]) -> nnx.State:
  """`template` (a MultimodalLM's Frozen state) holding HF backbone `name`'s weights, on `sharding`.

  `placed` caches the device copy per checkpoint, so edge and server naming the same
  checkpoint share one copy.
  """
  hf = bb.sources[name]
  if hf not in placed:
    placed[hf] = jax.device_put(bb.weights[hf], sharding)
  want = jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(template))
  got = {'backbone': jax.tree.map(lambda x: tuple(np.shape(x)), placed[hf])}
  if got != want:
    raise ValueError(f'{name}.backbone.hf = {hf!r}: weights do not fit the model built from its config')
  nnx.replace_by_pure_dict(template, {'backbone': placed[hf]})
  return template
