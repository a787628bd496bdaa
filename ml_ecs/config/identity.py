"""A run's identity: the config fields that decide what it computes, as compared when a workdir is
resumed (ml_ecs/run/trainer.py) and hashed into a grid cell's name (studies/compare/grid.py)."""
from __future__ import annotations

import copy
import json
from typing import Any

import ml_collections

# Fields added to the config after runs were written, each with the value at which a run computes what
# it computed before the field existed. At that value a field is not part of the identity, so a workdir
# or grid cell written before the field existed resumes instead of being refused or run again.
ADDED_FIELDS = {
    'edge_model.backbone.frozen_dtype': 'float32',
    'server_model.backbone.frozen_dtype': 'float32',
    'train.conv_impl': 'xla',
}


def identity(cfg_json: dict[str, Any]) -> dict[str, Any]:
  """`cfg_json` (a config as plain JSON values) without the ADDED_FIELDS that hold their neutral value."""
  out = copy.deepcopy(cfg_json)
  for dotted, neutral in ADDED_FIELDS.items():
    *parents, leaf = dotted.split('.')
    node = out
    for p in parents:
      node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf in node and node[leaf] == neutral:
      del node[leaf]
  return out


def identity_json(cfg: ml_collections.ConfigDict) -> str:
  """The identity as sorted JSON text: the text of the config itself when no added field was left out
  (so the hashes of configs written before those fields are unchanged)."""
  text = cfg.to_json_best_effort(sort_keys=True)
  full = json.loads(text)
  ident = identity(full)
  return text if ident == full else json.dumps(ident, sort_keys=True)


def config_differences(saved: Any, current: Any, prefix: str = '') -> list[str]:
  """Dotted names of the fields whose values differ between two config dicts."""
  if isinstance(saved, dict) and isinstance(current, dict):
    out = []
    for k in sorted(set(saved) | set(current)):
      name = f'{prefix}.{k}' if prefix else str(k)
      if k not in saved or k not in current:
        out.append(name)
      else:
        out += config_differences(saved[k], current[k], name)
    return out
  return [] if saved == current else [prefix]
