"""Model sizes and per-round communication of a config, without weights or training.

  python -m ml_ecs.run.sizing --config=configs/gpt2_pair.py
  python -m ml_ecs.run.sizing --config=configs/default.py --json=/tmp/sizes.json

Builds every model of the federation abstractly (`nnx.eval_shape`: shapes only), on
the config's partition of its dataset, and counts what `federation.init` would:
parameters per part of one edge model per cohort and of the server, the bytes of all
models, and one round's traffic (shared LoRA + fused representations, up and down) with
`ml_ecs.core.communication.accounting`. Hugging Face backbones (`backbone.hf`) are sized from
their config.json: a local directory, the local Hugging Face cache, or, when neither has
it, the architecture of the public GPT-2 checkpoints (`ml_ecs.backbones.resolve.KNOWN_GPT2`).

Ratios reported:
- ``comm/ratio``: bytes up + down of one round over the bytes of all models (what the
  main job logs per round);
- ``edge_lora_fraction``: one edge client's shared (communicated) LoRA over its whole
  model's parameters, the quantity the paper quotes (0.65%) for ML-ECS;
- ``edge_upload_fraction``: one client's upload (LoRA + representations) over its model.
"""
from __future__ import annotations

import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from ml_ecs.backbones import resolve as backbones
from ml_ecs.core import communication
from ml_ecs.algorithms.ml_ecs import mma
from ml_ecs.models import params
from ml_ecs.models.keys import KeyStream
from ml_ecs.core.sampling import sampled_count
from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.data.loaders import load_dataset
from ml_ecs.data.partition import partition
from ml_ecs.models.multimodal import MultimodalLM, node_options
from ml_ecs.data.text import build_task_text
from ml_ecs.config.validation import validate

ITEMSIZE = 4   # float32 parameters and representations, as the main job uses


def _abstract_parts(shapes, encoders, modalities, mcfg, vocab_size, options) -> dict[str, nnx.State]:
  """The parts of a node as the main job builds it (`options`: `node_options` of the config)."""
  model = nnx.eval_shape(lambda: MultimodalLM(shapes, encoders, modalities, mcfg, vocab_size, rngs=KeyStream(0),
                                              **options))
  return params.split_model(model)[1]


def size_config(cfg: ml_collections.ConfigDict, dataset: MultimodalDataset | None = None) -> dict[str, Any]:
  """Parameter counts, model bytes and one round's communication of `cfg` (see the module docstring)."""
  validate(cfg)
  ds = dataset if dataset is not None else load_dataset(cfg.data)
  notes: list[str] = []   # fields the checkpoints decide
  bb = backbones.resolve(cfg, load_weights=False, log=notes.append)
  if any(s == 'pretrained' for s in bb.sources.values()) and not bb.vocab_sizes:
    text_vocab = build_task_text(ds, cfg.text).tokenizer.vocab_size   # our BPE: its real size (fast)
  else:
    text_vocab = next(iter(bb.vocab_sizes.values()))   # the HF tokenizer (ours is built on it)
  part = partition(ds, cfg.data)
  modalities = ds.modality_names
  shapes = {m: x.shape[1:] for m, x in ds.modalities.items()}

  def parts_of(name, mods, enc):
    parts = _abstract_parts({k: shapes[k] for k in mods}, enc, modalities, bb.models[name],
                            bb.vocab_size(name, text_vocab), node_options(cfg, name))
    return {**parts, 'frozen': params.store_frozen(parts['frozen'], cfg[name].backbone.frozen_dtype)}

  edge, acct_clients, shared = [], [], None
  for clients in part.cohorts():
    c0 = clients[0]
    parts = parts_of('edge_model', c0.modalities, dict(c0.encoder_types))
    counts = params.count_parts(parts)
    edge.append({'modalities': list(c0.modalities), 'encoders': dict(c0.encoder_types), 'clients': len(clients),
                 'params': counts})
    shared = parts['shared']
    acct_clients += [(c.client_id, [modalities.index(m) for m in c.modalities], len(c.public_idx),
                      counts['total']['bytes']) for c in clients]
  server_parts = parts_of('server_model', modalities, {k: cfg.data.encoders[k][0] for k in modalities})
  server = params.count_parts(server_parts)
  leaf_mod = mma.leaf_modalities(shared, modalities)
  leaf_bytes = [(mi, int(np.prod(x.shape)) * x.dtype.itemsize)
                for mi, x in zip(jax.tree.leaves(leaf_mod), jax.tree.leaves(shared))]
  acct = communication.accounting(acct_clients, leaf_bytes, cfg.edge_model.d_z, ITEMSIZE, server['total']['bytes'])
  sampled = []
  for clients in part.cohorts():
    sampled += [c.client_id for c in clients[:sampled_count(cfg.train.client_fraction, len(clients))]]
  communicate, reps = bool(cfg.method.communicate), bool(cfg.method.communicate and cfg.method.se_ccl)
  round_ = acct.round_bytes(np.array(sampled), communicate, reps)
  model_bytes = np.array([b for *_, b in acct_clients])
  return {
      'backbones': bb.describe(), 'notes': notes,
      'edge_cohorts': edge, 'server': server, 'total_model_bytes': int(acct.total_model_bytes),
      'num_clients': len(part.clients), 'clients_per_round': len(sampled),
      'per_client': {'shared_lora_bytes': int(acct.shared_bytes.max()),
                     'reps_bytes': int(acct.reps_bytes.max()),
                     'model_bytes': int(model_bytes.max())},
      'round': {k: int(v) if k != 'comm/ratio' else float(v) for k, v in round_.items()},
      'edge_lora_fraction': float(np.max(acct.shared_bytes / model_bytes)),
      'edge_upload_fraction': float(np.max((acct.shared_bytes + acct.reps_bytes * reps) / model_bytes)),
  }


def _mb(b: int) -> str:
  return f'{b / 1e6:,.2f} MB'


def format_sizes(s: dict[str, Any]) -> str:
  """A readable report of `size_config`'s result."""
  lines = ['backbones:']
  for name in backbones.MODELS:
    b = s['backbones'][name]['backbone']
    lines.append(f"  {name}: {s['backbones'][name]['source']} (width {b['width']}, {b['layers']} layers, "
                 f"{b['heads']} heads, max_len {b['max_len']}; LoRA r={b['lora_rank']} on {', '.join(b['lora_targets'])})")
  lines.append(f"{'model':<34}{'params':>14}{'frozen':>14}{'shared LoRA':>13}{'private':>11}{'bytes':>14}")
  rows = [(f"edge {'+'.join(e['modalities'])} x{e['clients']}", e['params']) for e in s['edge_cohorts']]
  for label, p in rows + [('server', s['server'])]:
    lines.append(f"{label:<34}{p['total']['params']:>14,}{p['frozen']['params']:>14,}{p['shared']['params']:>13,}"
                 f"{p['private']['params']:>11,}{_mb(p['total']['bytes']):>14}")
  r, pc = s['round'], s['per_client']
  lines += [
      f"all models: {_mb(s['total_model_bytes'])} ({s['num_clients']} edge clients + server)",
      f"per client and round: shared LoRA {_mb(pc['shared_lora_bytes'])}, representations {_mb(pc['reps_bytes'])} "
      f"(each way), its model {_mb(pc['model_bytes'])}",
      f"one round ({s['clients_per_round']} clients): up {_mb(r['comm/bytes_up'])}, down {_mb(r['comm/bytes_down'])}; "
      f"comm/ratio (up + down over all models) {r['comm/ratio']:.4%}",
      f"edge shared LoRA / edge model: {s['edge_lora_fraction']:.4%} (paper: 0.65%); "
      f"edge upload / edge model: {s['edge_upload_fraction']:.4%}",
  ]
  return '\n'.join(lines)


def main(argv=None) -> int:
  import json

  from absl import app, flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).')
  out = flags.DEFINE_string('json', None, 'Also write the numbers as JSON here.')
  flags.mark_flags_as_required(['config'])

  def run(argv):
    del argv
    s = size_config(config.value)
    print(format_sizes(s))
    if out.value:
      with open(out.value, 'w') as f:
        json.dump(s, f, indent=1, default=str)
    return 0
  app.run(run, argv)
  return 0


if __name__ == '__main__':
  sys.exit(main())
