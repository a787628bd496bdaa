"""Exports a node of a finished (or checkpointed) run as a Hugging Face PEFT LoRA adapter.

  python launch/export_peft.py --workdir=DIR --client=3 --which=personalised --out=OUT
  python launch/export_peft.py --workdir=DIR --server --out=OUT

The run is rebuilt from its workdir: `federation.init` on its config.json (the tokenizer
and pretrained backbones come from the workdir's tokenizer.json and backbones/ cache,
so nothing is retrained), then the newest checkpoint is restored onto that template
state. The node's backbone LoRA is written by `ml_ecs.backbones.peft_io.export_peft` into OUT
(adapter_config.json, adapter_model.safetensors). PEFT needs a base model: for a Hugging
Face backbone (`backbone.hf`) adapter_config.json names it; for our own pretrained
backbone, its frozen weights are exported with `export_hf_gpt2` into OUT/base_model
(config.json, model.safetensors, tokenizer files) and the adapter points there.

Only the LM side is PEFT-expressible: the node's encoders, modality adapters and
connector (which produce the soft prompt) are not part of the export.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import ml_collections

from ml_ecs.core import federation
from ml_ecs.backbones import peft_io
from ml_ecs.run.checkpoint import Checkpointer
from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.backbones.hf_gpt2 import export_hf_gpt2
from ml_ecs.models.multimodal import node_backbone_config, node_options
from ml_ecs.config.validation import validate

BASE_DIR = 'base_model'


def _tuples(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The validated config of a run from its config.json (JSON lists back to tuples)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: {workdir} is not a workdir of the main job (launch/train.py)')
  with open(path) as f:
    return validate(ml_collections.ConfigDict(_tuples(json.load(f))))


def load_run(workdir: str, *, dataset: MultimodalDataset | None = None, cache_dir: str | None = None,
             step: int | None = None, log: Callable[[str], None] = lambda s: None
             ) -> tuple[federation.Setup, federation.State, int]:
  """(setup, state restored from the checkpoint of round `step` (default newest), that round) of a workdir.

  `dataset`: the in-memory dataset the run was trained on, if it was not read from its config.
  """
  cfg = load_config(workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'{workdir} has no checkpoints/ (a run with checkpointing off, or not started)')
  setup, template = federation.init(cfg, workdir=workdir, dataset=dataset, log=log, cache_dir=cache_dir)
  ckpt = Checkpointer(ckpt_dir)
  try:
    steps = ckpt.steps()
    if not steps:
      raise FileNotFoundError(f'{ckpt_dir} holds no checkpoint yet')
    if step is not None and step not in steps:
      raise ValueError(f'no checkpoint of round {step} in {ckpt_dir}; there are rounds {steps}')
    step = steps[-1] if step is None else step
    state, _ = ckpt.restore(template, step)
  finally:
    ckpt.close()
  return setup, state, step


def node(setup: federation.Setup, state: federation.State, client: int | None = None, server: bool = False
         ) -> tuple[dict, Any, ml_collections.ConfigDict, str]:
  """(trainables, frozen state, model config, model name) of client id `client`, or of the server.

  The model config's backbone carries the node's gate form (as the node was built), so an
  exported adapter folds in the gates the node really used."""
  if (client is None) == (not server):
    raise ValueError('name exactly one node: a client id or the server')
  def with_gates(name):
    opts = node_options(setup.cfg, name)
    mcfg = ml_collections.ConfigDict(setup.model_cfgs[name].to_dict())
    mcfg.backbone = node_backbone_config(mcfg.backbone, opts['gates'], opts['gate_init'])
    return mcfg

  if server:
    return state.server.trainables, setup.server_frozen, with_gates('server_model'), 'server_model'
  for c, cs in zip(setup.cohorts, state.cohorts):
    hits = [j for j in range(c.num_real) if int(c.client_ids[j]) == client]
    if hits:
      trainables = jax.tree.map(lambda x, j=hits[0]: x[j], cs.trainables)
      return trainables, setup.edge_frozen, with_gates('edge_model'), 'edge_model'
  ids = sorted(int(i) for c in setup.cohorts for i in c.client_ids[:c.num_real])
  raise ValueError(f'unknown client id {client}: this run has clients {ids[0]}..{ids[-1]} ({len(ids)} clients)')


def export_node(setup: federation.Setup, state: federation.State, out: str, *, client: int | None = None,
                server: bool = False, which: str = 'personalised') -> dict[str, str]:
  """Writes one node's PEFT adapter into `out` (and its base model, for our own backbone)."""
  if which not in peft_io.WHICH:
    raise ValueError(f'which={which!r}; expected one of {peft_io.WHICH}')
  trainables, frozen, mcfg, name = node(setup, state, client, server)
  source = setup.backbones[name]['source']
  if source == 'pretrained':
    base = os.path.abspath(os.path.join(out, BASE_DIR))
    export_hf_gpt2(frozen, mcfg.backbone, base, tokenizer=setup.text.tokenizer)
  else:
    base = os.path.abspath(source) if os.path.isdir(source) else source   # a hub name stays a name
  peft_io.export_peft(trainables, frozen, mcfg.backbone, out, which=which, base_model_name_or_path=base)
  return {'adapter': os.path.abspath(out), 'base_model': base, 'node': 'server' if server else f'client {client}',
          'which': which}


def export_peft_from_workdir(workdir: str, out: str, *, client: int | None = None, server: bool = False,
                             which: str = 'personalised', step: int | None = None,
                             dataset: MultimodalDataset | None = None, cache_dir: str | None = None,
                             log: Callable[[str], None] = lambda s: None) -> dict[str, str]:
  """`load_run` + `export_node`; returns {'adapter', 'base_model', 'node', 'which', 'round'}."""
  if (client is None) == (not server):
    raise ValueError('name exactly one node: --client=ID or --server')
  setup, state, step = load_run(workdir, dataset=dataset, cache_dir=cache_dir, step=step, log=log)
  return {**export_node(setup, state, out, client=client, server=server, which=which), 'round': str(step)}
