"""A node's backbone LoRA out to, and in from, a Hugging Face PEFT adapter directory.

Our `LoRALinear` computes  y = x W + b + s (g_s x A_s B_s + g_p x A_p B_p),
s = lora_alpha / r, with the block's gates g = `Block.mix_gates()`. PEFT's LoRA
on a GPT-2 ``Conv1D`` computes  y = base(x) + scaling * x A^T B^T  with
``lora_A.weight`` A [R, in], ``lora_B.weight`` B [out, R], scaling = alpha / R
(alpha / sqrt(R) with use_rslora; per module with rank_pattern / alpha_pattern).

Export (`export_peft`):

- ``which='personalised'`` (default): the node's model exactly, by
  concatenating along the rank: A = [A_s | A_p], B = [g_s B_s ; g_p B_p],
  R = 2r, lora_alpha = 2 * ours, so that alpha / R = ours.
- ``which='shared'``: the shared (communicated, aggregated) adapter alone,
  R = r, same alpha, without the node's gate: the global model.

Import (`import_peft`) is the inverse: ``'shared'`` writes the adapter into
the shared LoRA (R <= r; rows beyond R of B_s are zero); ``'personalised'``
needs R = 2r and splits it into the shared and private halves, dividing by the
node's current gates so the node's output equals the adapter's. Modules the
adapter does not cover get B = 0 (no update). Key names follow PEFT's saved
format for GPT2LMHeadModel: ``base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight``.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ml_ecs.models.decoder import LORA_TARGETS, Block
from ml_ecs.models.keys import KeyStream
from ml_ecs.backbones.hf_gpt2 import HF_MODULES

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
PEFT_PREFIX = 'base_model.model.transformer.'
WHICH = ('shared', 'personalised')
_KEY = re.compile(r'^h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(lora_A|lora_B)\.weight$')
_OURS = {v: k for k, v in HF_MODULES.items()}


def _backbone(pure: dict, what: str) -> dict:
  """The backbone subtree ({'blocks': ...}) of a pure dict of a DecoderLM or MultimodalLM part."""
  if 'blocks' in pure:
    return pure
  if 'backbone' in pure and 'blocks' in pure['backbone']:
    return pure['backbone']
  raise ValueError(f'{what}: no backbone blocks found (top-level keys {sorted(map(str, pure))}); expected the '
                   'state of a DecoderLM or MultimodalLM part from ml_ecs.models.params.split_model')


def _targets(cfg: ml_collections.ConfigDict) -> list[str]:
  return [t for t in LORA_TARGETS if t in cfg.lora_targets] if cfg.lora_rank > 0 else []


def _gates_fn(cfg: ml_collections.ConfigDict):
  """gate logits -> Block.mix_gates() (the block's own definition, on an abstract Block)."""
  block = nnx.eval_shape(lambda: Block(cfg, rngs=KeyStream(0)))

  def gates(logits):
    block.gate.set_value(jnp.asarray(logits, jnp.float32))
    return np.asarray(block.mix_gates())
  return gates


def _get(tree: dict, i: int, t: str, name: str, what: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
  try:
    x = np.asarray(tree['blocks'][i][t][name], np.float32)
  except KeyError:
    raise ValueError(f'{what}: blocks/{i}/{t}/{name} missing') from None
  if shape is not None and x.shape != shape:
    raise ValueError(f'{what}: blocks/{i}/{t}/{name} has shape {x.shape}, expected {shape} '
                     '(pass one node\'s trainables, not a cohort stacked on a client axis: params.unstack)')
  return x


def peft_tensors(trainables: dict[str, Any], backbone_cfg: ml_collections.ConfigDict,
                 which: str = 'personalised') -> tuple[dict[str, np.ndarray], int, float]:
  """(PEFT adapter tensors, r, lora_alpha) of a node's backbone LoRA; see the module docstring."""
  if which not in WHICH:
    raise ValueError(f'which={which!r}; expected one of {WHICH}')
  cfg, r = backbone_cfg, int(backbone_cfg.lora_rank)
  targets = _targets(cfg)
  if not targets:
    raise ValueError('backbone config has no LoRA (lora_rank 0 or empty lora_targets): nothing to export')
  shared = _backbone(nnx.to_pure_dict(trainables['shared']), "trainables['shared']")
  private = _backbone(nnx.to_pure_dict(trainables['private']), "trainables['private']") if which == 'personalised' else None
  gates = _gates_fn(cfg) if which == 'personalised' else None
  out: dict[str, np.ndarray] = {}
  for i in range(cfg.layers):
    g = gates(private['blocks'][i]['gate']) if private is not None else None
    for t in targets:
      a_s = _get(shared, i, t, 'shared_a', "trainables['shared']")
      din = a_s.shape[0]
      _get(shared, i, t, 'shared_a', "trainables['shared']", (din, r))
      b_s = _get(shared, i, t, 'shared_b', "trainables['shared']")
      dout = b_s.shape[-1]
      _get(shared, i, t, 'shared_b', "trainables['shared']", (r, dout))
      if private is None:
        a, b = a_s, b_s
      else:
        a_p = _get(private, i, t, 'private_a', "trainables['private']", (din, r))
        b_p = _get(private, i, t, 'private_b', "trainables['private']", (r, dout))
        a = np.concatenate([a_s, a_p], axis=1)
        b = np.concatenate([g[0] * b_s, g[1] * b_p], axis=0)
      key = f'{PEFT_PREFIX}h.{i}.{HF_MODULES[t]}'
      out[f'{key}.lora_A.weight'] = np.ascontiguousarray(a.T, np.float32)
      out[f'{key}.lora_B.weight'] = np.ascontiguousarray(b.T, np.float32)
  rank = r if which == 'shared' else 2 * r
  alpha = float(cfg.lora_alpha) * rank / r
  return out, rank, alpha


def export_peft(trainables: dict[str, Any], frozen: Any, backbone_cfg: ml_collections.ConfigDict,
                out_dir: str | os.PathLike, *, which: str = 'personalised',
                base_model_name_or_path: str | None = None) -> str:
  """Writes a node's backbone LoRA as a PEFT adapter directory; returns the directory.

  trainables: one node's {'shared', 'private', ...} nnx States (ml_ecs.models.params.split_model
    of a MultimodalLM or DecoderLM; 'private' holds the gates).
  frozen: the node's Frozen state or pure dict (checks that the adapter fits the base
    model's shapes), or None.
  which: 'personalised' (shared + private with the gates, the node's exact model) or
    'shared' (the aggregated adapter alone).
  base_model_name_or_path: recorded in adapter_config.json (e.g. the directory written by
    ml_ecs.backbones.hf_gpt2.export_hf_gpt2, or a hub name).
  """
  from safetensors.numpy import save_file
  tensors, rank, alpha = peft_tensors(trainables, backbone_cfg, which)
  if frozen is not None:
    fz = _backbone(nnx.to_pure_dict(frozen) if isinstance(frozen, nnx.State) else frozen, 'frozen')
    for key, x in tensors.items():
      i, mod, ab = _KEY.match(key[len(PEFT_PREFIX):]).groups()
      kshape = np.shape(fz['blocks'][int(i)][_OURS[mod]]['kernel'])
      want = (rank, kshape[0]) if ab == 'lora_A' else (kshape[1], rank)
      if x.shape != want:
        raise ValueError(f'{key}: shape {x.shape} does not fit the frozen kernel {kshape} (expected {want})')
  targets = _targets(backbone_cfg)
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model_name_or_path,
      'r': rank, 'lora_alpha': alpha, 'target_modules': [HF_MODULES[t] for t in targets],
      'fan_in_fan_out': True, 'lora_dropout': 0.0, 'bias': 'none', 'use_rslora': False, 'use_dora': False,
      'modules_to_save': None, 'init_lora_weights': True, 'inference_mode': True,
      'rank_pattern': {}, 'alpha_pattern': {}, 'layers_to_transform': None, 'layers_pattern': None,
  }
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, ADAPTER_CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS),
            metadata={'format': 'pt', 'ml_ecs.which': which, 'ml_ecs.lora_rank': str(backbone_cfg.lora_rank)})
  return os.fspath(out_dir)


def _pattern(patterns: dict[str, Any], module_key: str, default: Any) -> Any:
  """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
  for key in patterns:
    if re.match(rf'(.*\.)?({key})$', module_key):
      return patterns[key]
  return default


def read_peft_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple[int, str], tuple[np.ndarray, np.ndarray, float]]]:
  """(adapter_config, {(layer, our module name): (A [in, R], B [R, out], scaling)}) of a PEFT LoRA directory."""
  from safetensors.numpy import load_file
  cfg_file = os.path.join(adapter_dir, ADAPTER_CONFIG)
  w_file = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f'{cfg_file} not found: a PEFT adapter directory needs {ADAPTER_CONFIG}')
  if not os.path.isfile(w_file):
    hint = ' (found adapter_model.bin: re-save it with safe_serialization=True)' \
        if os.path.exists(os.path.join(adapter_dir, 'adapter_model.bin')) else ''
    raise FileNotFoundError(f'{w_file} not found: expected the adapter weights as safetensors{hint}')
  with open(cfg_file) as f:
    config = json.load(f)
  if config.get('peft_type') != 'LORA':
    raise ValueError(f'{cfg_file}: peft_type is {config.get("peft_type")!r}, expected "LORA"')
  for field in ('use_dora', 'lora_bias'):
    if config.get(field):
      raise ValueError(f'{cfg_file}: {field} is true; only plain LoRA can be imported')
  if config.get('modules_to_save'):
    raise ValueError(f'{cfg_file}: modules_to_save {config["modules_to_save"]} is set; only LoRA weights can be imported')
  rslora = bool(config.get('use_rslora', False))
  tensors = load_file(w_file)
  found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
  for key, x in tensors.items():
    k = key[len('base_model.model.'):] if key.startswith('base_model.model.') else key
    k = k[len('transformer.'):] if k.startswith('transformer.') else k
    m = _KEY.match(k)
    if m is None:
      raise ValueError(f'{w_file}: tensor {key!r} is not a LoRA weight of a GPT-2 attn.c_attn / attn.c_proj / '
                       'mlp.c_fc / mlp.c_proj module (e.g. base_model.model.transformer.h.0.attn.c_attn.lora_A.weight)')
    found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = np.asarray(x, np.float32)
  out = {}
  for (i, mod), ab in sorted(found.items()):
    name = f'transformer.h.{i}.{mod}'
    if set(ab) != {'lora_A', 'lora_B'}:
      raise ValueError(f'{w_file}: {name} has {sorted(ab)} but needs both lora_A and lora_B')
    a, b = ab['lora_A'], ab['lora_B']
    rank = a.shape[0]
    if b.shape[1] != rank:
      raise ValueError(f'{w_file}: {name}.lora_B.weight has shape {b.shape}, expected [out, {rank}] '
                       f'to match lora_A.weight {a.shape}')
    r_cfg = _pattern(config.get('rank_pattern') or {}, name, config.get('r'))
    if r_cfg is not None and int(r_cfg) != rank:
      raise ValueError(f'{w_file}: {name}.lora_A.weight has rank {rank}, but {ADAPTER_CONFIG} says r = {r_cfg}')
    alpha = float(_pattern(config.get('alpha_pattern') or {}, name, config.get('lora_alpha', 8)))
    scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    out[(i, _OURS[mod])] = (a.T, b.T, scaling)
  return config, out


def import_peft(adapter_dir: str | os.PathLike, trainables: dict[str, Any], backbone_cfg: ml_collections.ConfigDict,
                *, which: str = 'shared') -> dict[str, Any]:
  """A copy of `trainables` whose backbone LoRA holds the PEFT adapter of `adapter_dir`.

  which='shared': into the shared LoRA (adapter rank R <= lora_rank); the private LoRA
    and gates are left as they are (a fresh node, private B = 0 and gates 1, then
    computes exactly the adapter's model).
  which='personalised': R = 2 * lora_rank, first half into the shared LoRA, second into
    the private one, each divided by the node's gate so the node computes the adapter's
    model (inverse of export_peft(which='personalised')).
  """
  if which not in WHICH:
    raise ValueError(f'which={which!r}; expected one of {WHICH}')
  cfg, r = backbone_cfg, int(backbone_cfg.lora_rank)
  s = float(cfg.lora_alpha) / max(r, 1)
  _, adapter = read_peft_adapter(adapter_dir)
  targets = _targets(cfg)
  for (i, t) in adapter:
    if i >= cfg.layers or t not in targets:
      raise ValueError(f'{adapter_dir}: adapter has transformer.h.{i}.{HF_MODULES[t]}, but the model has '
                       f'{cfg.layers} layers and LoRA on {[HF_MODULES[x] for x in targets]}')
  shared_state = jax.tree.map(lambda x: x, trainables['shared'])
  private_state = jax.tree.map(lambda x: x, trainables['private'])
  shared_pure = nnx.to_pure_dict(shared_state)
  private_pure = nnx.to_pure_dict(private_state)
  sh = _backbone(shared_pure, "trainables['shared']")
  pr = _backbone(private_pure, "trainables['private']")
  gates = _gates_fn(cfg)
  for i in range(cfg.layers):
    g = gates(pr['blocks'][i]['gate'])
    for t in targets:
      a_s = _get(sh, i, t, 'shared_a', "trainables['shared']")
      din = a_s.shape[0]
      a_s = _get(sh, i, t, 'shared_a', "trainables['shared']", (din, r)).copy()
      dout = _get(sh, i, t, 'shared_b', "trainables['shared']").shape[-1]
      b_s = np.zeros((r, dout), np.float32)
      name = f'transformer.h.{i}.{HF_MODULES[t]}'
      if which == 'shared':
        if (i, t) in adapter:
          a, b, scaling = adapter[(i, t)]
          rank = a.shape[1]
          if rank > r or a.shape[0] != din or b.shape[1] != dout:
            raise ValueError(f'{adapter_dir}: {name} has lora_A {a.T.shape}, lora_B {b.T.shape}; expected rank <= {r} '
                             f'and lora_A [R, {din}], lora_B [{dout}, R]')
          a_s[:, :rank] = a
          b_s[:rank] = b * (scaling / s)
      else:
        a_p = _get(pr, i, t, 'private_a', "trainables['private']", (din, r)).copy()
        b_p = np.zeros((r, dout), np.float32)
        if (i, t) in adapter:
          a, b, scaling = adapter[(i, t)]
          if a.shape != (din, 2 * r) or b.shape != (2 * r, dout):
            raise ValueError(f'{adapter_dir}: {name} has lora_A {a.T.shape}, lora_B {b.T.shape}; a personalised '
                             f'import needs rank 2 * lora_rank = {2 * r}: lora_A [{2 * r}, {din}], lora_B [{dout}, {2 * r}]')
          if np.any(np.abs(g) < 1e-6):
            raise ValueError(f'gates {g} of block {i} are ~0: cannot express the adapter through them')
          a_s, a_p = a[:, :r].copy(), a[:, r:].copy()
          b_s = b[:r] * (scaling / (s * g[0]))
          b_p = b[r:] * (scaling / (s * g[1]))
        pr['blocks'][i][t]['private_a'] = jnp.asarray(a_p)
        pr['blocks'][i][t]['private_b'] = jnp.asarray(b_p, jnp.float32)
      sh['blocks'][i][t]['shared_a'] = jnp.asarray(a_s)
      sh['blocks'][i][t]['shared_b'] = jnp.asarray(b_s, jnp.float32)
  nnx.replace_by_pure_dict(shared_state, shared_pure)
  nnx.replace_by_pure_dict(private_state, private_pure)
  return {**trainables, 'shared': shared_state, 'private': private_state}
