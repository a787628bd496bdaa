"""All config validation in one place: `validate(cfg)` before any work is done.

Each error names the field, the value it has and what is allowed, in one line.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import ml_collections

from ml_ecs.losses.ccl import CCL_ANCHORS, CCL_KINDS
from ml_ecs.data.loaders import DATA_SOURCES, check_data_config
from ml_ecs.algorithms.ml_ecs.mma import MODALITY_WEIGHTINGS, WEIGHTINGS
from ml_ecs.models.decoder import GATE_FORMS
from ml_ecs.models.multimodal import MODALITY_PARAMS
from ml_ecs.core.node import LR_SCHEDULES
from ml_ecs.backbones.pretrain import CORPORA
from ml_ecs.algorithms.ml_ecs.se_ccl import HEADS, RELIABILITY
from ml_ecs.models.decoder import LORA_TARGETS
from ml_ecs.models.conv import CONV_SETTINGS
from ml_ecs.models.params import FROZEN_DTYPES
from ml_ecs.models.encoders import ENCODER_TYPES
from ml_ecs.aggregation import robust
from ml_ecs.data.partition import TEST_ORDERS
from ml_ecs.backbones.resolve import RANDOM
from ml_ecs.errors import ConfigError, DataError  # noqa: F401  (raised here; callers catch them from here)
from ml_ecs.algorithms import registry
from ml_ecs.algorithms.mmfl import MMFL

STRAGGLER_POLICIES = ('drop', 'discount')
ACCOUNTANTS = ('rdp', 'pld')


def _get(cfg: ml_collections.ConfigDict, field: str) -> Any:
  node = cfg
  for part in field.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise ConfigError(f'config field {field} is missing')
    node = node[part]
  return node


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f'config field {field} = {value!r}: expected {allowed}')


def _int(cfg, field: str, lo: int | None = None, hi: int | None = None) -> int:
  v = _get(cfg, field)
  if isinstance(v, bool) or not isinstance(v, numbers.Integral):
    _fail(field, v, 'an integer')
  if (lo is not None and v < lo) or (hi is not None and v > hi):
    _fail(field, v, f'an integer in [{lo if lo is not None else "-inf"}, {hi if hi is not None else "inf"}]')
  return int(v)


def _float(cfg, field: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> float:
  v = _get(cfg, field)
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v:
    _fail(field, v, 'a number')
  below = lo is not None and (v <= lo if lo_open else v < lo)
  above = hi is not None and (v >= hi if hi_open else v > hi)
  if below or above:
    left = '(' if lo_open else '['
    right = ')' if hi_open else ']'
    _fail(field, v, f'a number in {left}{lo if lo is not None else "-inf"}, {hi if hi is not None else "inf"}{right}')
  return float(v)


def _choice(cfg, field: str, allowed: Sequence[Any]) -> Any:
  v = _get(cfg, field)
  if v not in allowed:
    _fail(field, v, f'one of {tuple(allowed)}')
  return v


def _bool(cfg, field: str) -> bool:
  v = _get(cfg, field)
  if not isinstance(v, bool):
    _fail(field, v, 'True or False')
  return v


def _model(cfg, name: str) -> None:
  b = f'{name}.backbone'
  for f in ('encoder_width', 'd_enc', 'adapter_rank', 'd_fuse', 'd_z', 'prompt_len'):
    _int(cfg, f'{name}.{f}', 1)
  _float(cfg, f'{name}.lora_alpha', 0.0, lo_open=True)
  width, heads = _int(cfg, f'{b}.width', 1), _int(cfg, f'{b}.heads', 1)
  if width % heads:
    _fail(f'{b}.heads', heads, f'a divisor of {b}.width={width}')
  _int(cfg, f'{b}.layers', 1)
  _int(cfg, f'{b}.mlp_ratio', 1)
  _int(cfg, f'{b}.lora_rank', 1)
  _float(cfg, f'{b}.lora_alpha', 0.0, lo_open=True)
  targets = _get(cfg, f'{b}.lora_targets')
  if isinstance(targets, str) or not targets or any(t not in LORA_TARGETS for t in targets):
    _fail(f'{b}.lora_targets', targets, f'a non-empty tuple of the decoder targets {LORA_TARGETS}')
  _choice(cfg, f'{b}.frozen_dtype', FROZEN_DTYPES)
  hf = cfg[name].backbone.get('hf', '')
  if not isinstance(hf, str):
    _fail(f'{b}.hf', hf, "'' (our own pretrained backbone) or a Hugging Face GPT-2 hub name or checkpoint directory")
  need = cfg[name].prompt_len + cfg.text.instr_len + cfg.text.answer_len
  max_len = _int(cfg, f'{b}.max_len', 1)
  # With hf set the checkpoint decides max_len (n_positions); ml_ecs.backbones.resolve checks it at init.
  if need > max_len and not hf:
    _fail(f'{b}.max_len', max_len, f'>= {name}.prompt_len + text.instr_len + text.answer_len = {need}')


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field of an experiment config; returns it unchanged or raises ConfigError."""
  _int(cfg, 'seed', 0)
  # data
  _choice(cfg, 'data.name', DATA_SOURCES)
  if cfg.data.name not in ('embedded', 'synthetic') and not _get(cfg, 'data.path'):
    _fail('data.path', cfg.data.path, f'the directory of the {cfg.data.name!r} files (data.name={cfg.data.name!r})')
  try:
    check_data_config(cfg.data)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _int(cfg, 'data.num_clients', 1)
  _int(cfg, 'data.seed', 0)
  _float(cfg, 'data.public_fraction', 0.0, 1.0, lo_open=True, hi_open=True)
  _float(cfg, 'data.public_test_fraction', 0.0, 1.0, lo_open=True, hi_open=True)
  _float(cfg, 'data.client_test_fraction', 0.0, 1.0, lo_open=True, hi_open=True)
  _float(cfg, 'data.client_val_fraction', 0.0, 1.0, hi_open=True)
  if 'public_holdout_fraction' in cfg.data:   # absent in configs saved before it existed: no hold-out
    _float(cfg, 'data.public_holdout_fraction', 0.0, 1.0, hi_open=True)
  if 'test_order' in cfg.data:   # absent in configs saved before it existed: 'recordings'
    _choice(cfg, 'data.test_order', TEST_ORDERS)
  _int(cfg, 'data.modality_seed', -1)
  _float(cfg, 'data.dirichlet_alpha', 0.0, lo_open=True)
  _int(cfg, 'data.num_device_types', 0)
  _float(cfg, 'data.modality_missing_rate', 0.0, 1.0, hi_open=True)
  _float(cfg, 'data.sample_missing_rate', 0.0, 1.0, hi_open=True)
  _int(cfg, 'data.public_per_client', 1)
  if 'max_public_sequences' in cfg.data:
    _int(cfg, 'data.max_public_sequences', 0)
  _float(cfg, 'data.label_fraction', 0.0, 1.0, lo_open=True)
  _bool(cfg, 'data.public_labels')
  _float(cfg, 'data.server_label_fraction', 0.0, 1.0, lo_open=True)
  encoders = _get(cfg, 'data.encoders')
  for modality, kinds in encoders.items():
    if isinstance(kinds, str) or not kinds or any(k not in ENCODER_TYPES for k in kinds):
      _fail(f'data.encoders.{modality}', kinds, f'a non-empty tuple of encoder types from {ENCODER_TYPES}')
  sets = _get(cfg, 'data.modality_sets')
  if sets:
    if len(sets) != cfg.data.num_clients:
      _fail('data.modality_sets', sets, f'one modality tuple per client (data.num_clients={cfg.data.num_clients})')
    for s in sets:
      unknown = [m for m in s if m not in encoders]
      if not s or unknown:
        _fail('data.modality_sets', sets, f'non-empty tuples of modalities from data.encoders {tuple(encoders)}')
  # text and models
  _int(cfg, 'text.vocab_size', 16)
  _int(cfg, 'text.instr_len', 1)
  _int(cfg, 'text.answer_len', 2)
  if not isinstance(_get(cfg, 'text.instruction'), str):
    _fail('text.instruction', cfg.text.instruction, 'a string')
  _model(cfg, 'edge_model')
  _model(cfg, 'server_model')
  _int(cfg, 'pretrain.steps', 0)
  _int(cfg, 'pretrain.batch_size', 1)
  _float(cfg, 'pretrain.learning_rate', 0.0, 1.0, lo_open=True)
  _choice(cfg, 'pretrain.corpus', CORPORA)
  # training
  rounds = _int(cfg, 'train.rounds', 0)
  _float(cfg, 'train.client_fraction', 0.0, 1.0, lo_open=True)
  for f in ('public_steps', 'private_steps', 'server_steps'):
    _int(cfg, f'train.{f}', 0)
  _int(cfg, 'train.batch_size', 1)
  _float(cfg, 'train.learning_rate', 0.0, 1.0, lo_open=True)
  if 'server_learning_rate' in cfg.train:   # absent in configs saved before it existed: train.learning_rate
    _float(cfg, 'train.server_learning_rate', 0.0, 1.0, lo_open=True)
  _float(cfg, 'train.weight_decay', 0.0)
  _float(cfg, 'train.clip_norm', 0.0, lo_open=True)
  _choice(cfg, 'train.lr_schedule', LR_SCHEDULES)
  _int(cfg, 'train.warmup_steps', 0)
  _int(cfg, 'train.eval_every', 1)
  _int(cfg, 'train.checkpoint_every', 0)
  _int(cfg, 'train.keep_checkpoints', 2)
  _int(cfg, 'train.client_chunk', 0)
  if 'conv_impl' in cfg.train:   # absent in configs saved before it existed: XLA's convolution
    _choice(cfg, 'train.conv_impl', CONV_SETTINGS)
  if 'host_state' in cfg.train:
    _bool(cfg, 'train.host_state')
  del rounds
  # simulated faults
  _float(cfg, 'train.dropout_rate', 0.0, 1.0, hi_open=True)
  _float(cfg, 'train.straggler_rate', 0.0, 1.0)
  _float(cfg, 'train.straggler_slowdown', 0.0, lo_open=True)
  _float(cfg, 'train.deadline', 1.0)
  _choice(cfg, 'train.straggler_policy', STRAGGLER_POLICIES)
  # robust aggregation and differential privacy
  _float(cfg, 'aggregation.clip_norm', 0.0)
  rule = _choice(cfg, 'aggregation.rule', robust.RULES)
  _float(cfg, 'aggregation.outlier_k', 0.0, lo_open=True)
  _float(cfg, 'aggregation.trim_fraction', 0.0, 0.5, hi_open=True)
  dp = _bool(cfg, 'dp.enabled')
  _float(cfg, 'dp.clip_norm', 0.0, lo_open=True)
  _float(cfg, 'dp.noise_multiplier', 0.0)
  _float(cfg, 'dp.delta', 0.0, 1.0, lo_open=True, hi_open=True)
  _choice(cfg, 'dp.accountant', ACCOUNTANTS)
  _bool(cfg, 'dp.noise_representations')
  _float(cfg, 'dp.repr_clip_norm', 0.0, lo_open=True)
  _float(cfg, 'dp.repr_noise_multiplier', 0.0)
  if dp and rule in ('trimmed_mean', 'median'):
    _fail('aggregation.rule', rule, "'mean' or 'norm_outlier' with dp.enabled=True (the DP noise is calibrated "
          'to a weighted mean)')
  # method
  _choice(cfg, 'method.name', registry.names())
  if dp and not _bool(cfg, 'method.communicate'):
    _fail('dp.enabled', True, 'False when method.communicate=False (nothing is aggregated)')
  _choice(cfg, 'method.ccl', CCL_KINDS)
  _float(cfg, 'method.lambda_ccl', 0.0)
  _float(cfg, 'method.tau_ccl', 0.0, lo_open=True)
  _choice(cfg, 'method.ccl_anchor', CCL_ANCHORS)
  _bool(cfg, 'method.amt')
  _choice(cfg, 'method.gates', GATE_FORMS)
  _float(cfg, 'method.gate_init', -20.0, 20.0)
  _choice(cfg, 'method.modality_params', MODALITY_PARAMS)
  _choice(cfg, 'method.mma_backbone', WEIGHTINGS)
  _choice(cfg, 'method.mma_modality', MODALITY_WEIGHTINGS)
  _bool(cfg, 'method.se_ccl')
  _float(cfg, 'method.lambda_se_ccl', 0.0)
  _float(cfg, 'method.tau_se_ccl', 0.0, lo_open=True)
  _choice(cfg, 'method.se_ccl_head', HEADS)
  _int(cfg, 'method.se_ccl_warmup', 0)
  _choice(cfg, 'method.se_ccl_reliability', RELIABILITY)
  if cfg.method.se_ccl_head == 'none' and cfg.edge_model.d_z != cfg.server_model.d_z:
    _fail('method.se_ccl_head', 'none', f"'mlp' when edge_model.d_z ({cfg.edge_model.d_z}) != "
          f'server_model.d_z ({cfg.server_model.d_z}): z is aligned directly')
  _float(cfg, 'method.fedprox_mu', 0.0)
  _bool(cfg, 'method.communicate')
  zero_fill = _bool(cfg, 'method.zero_fill')
  dropout = _float(cfg, 'method.modality_dropout', 0.0, 1.0, hi_open=True)
  if (zero_fill or dropout) and not issubclass(registry.get(cfg.method.name), MMFL):   # nothing ignored silently
    _fail('method.zero_fill' if zero_fill else 'method.modality_dropout', zero_fill or dropout,
          f'False / 0.0 with method.name={cfg.method.name!r}: only the multimodal baseline (mmfl) reads it')
  # evaluation and devices
  _int(cfg, 'eval.max_test_per_client', 1)
  _int(cfg, 'eval.max_server_test', 1)
  if 'clients_per_eval' in cfg.eval:
    _int(cfg, 'eval.clients_per_eval', 0)
  if 'final_full' in cfg.eval and _bool(cfg, 'eval.final_full') and not cfg.eval.get('clients_per_eval', 0):
    _fail('eval.final_full', True, 'False unless eval.clients_per_eval > 0 (without it every evaluation is full)')
  if _choice(cfg, 'eval.split', ('test', 'val')) == 'val' and not cfg.data.client_val_fraction:
    _fail('eval.split', 'val', "'test', or 'val' with data.client_val_fraction > 0")
  _int(cfg, 'mesh.num_devices', 0)
  return cfg


def check_devices(cfg: ml_collections.ConfigDict, device_count: int, process_count: int = 1) -> None:
  """mesh.num_devices against the devices JAX sees (called once JAX is up); with several
  processes the client mesh spans every device of every process."""
  n = _int(cfg, 'mesh.num_devices', 0)
  if n > device_count:
    _fail('mesh.num_devices', n, f'0 (all) or at most the {device_count} visible device(s)')
  if process_count > 1 and n not in (0, device_count):
    _fail('mesh.num_devices', n, f'0 or {device_count}: with {process_count} processes the client mesh spans '
          'every device of every process')


def check_partition(cfg: ml_collections.ConfigDict, dataset) -> None:
  """The data-dependent checks: the config's partition of `dataset` can be trained and evaluated.

  Raises ConfigError naming the field (public/test fractions that leave a split empty,
  too many clients for the sequences, a batch larger than every client's data).
  """
  from ml_ecs.data.partition import partition   # data code, imported only when data is at hand
  try:
    part = partition(dataset, cfg.data)
  except ValueError as e:
    if 'private sequences cannot give' in str(e):
      _fail('data.num_clients', cfg.data.num_clients, f'fewer clients: {e}')
    raise ConfigError(f'data config does not fit the dataset: {e}') from None
  if not len(part.public_train_idx):
    _fail('data.public_fraction', cfg.data.public_fraction, 'a fraction leaving at least one public training '
          f'sequence (the dataset has {len(set(dataset.sequence_ids.tolist()))} sequences)')
  if not len(part.public_test_idx):
    _fail('data.public_test_fraction', cfg.data.public_test_fraction, 'a fraction of the public sequences that '
          'leaves at least one for the server test split (or raise data.public_fraction)')
  largest = max(len(c.train_idx) for c in part.clients)
  if cfg.train.batch_size > largest:
    _fail('train.batch_size', cfg.train.batch_size, f'at most the largest client training split ({largest} '
          'samples; batches are drawn with replacement)')
  # The task text must fit text.instr_len / text.answer_len under our tokenizer (a Hugging Face checkpoint's
  # tokenizer is checked when init reads it); a config that does not fit is refused before anything is written.
  if not any(_reads_tokenizer(cfg[m].backbone.get('hf', '')) for m in ('edge_model', 'server_model')):
    from ml_ecs.data.text import build_task_text
    build_task_text(dataset, cfg.text)


def _reads_tokenizer(hf: str) -> bool:
  """Whether backbone.hf names a checkpoint whose tokenizer the text uses ('' and 'random:NAME' use ours)."""
  return bool(hf) and not str(hf).startswith(RANDOM)
