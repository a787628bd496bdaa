"""Command-line parsing of the launchers: a bad `--config.FIELD=...` is one `error:` line, not a traceback.

ml_collections raises a bare `AttributeError: "'mma_weights'"` from deep in absl's flag parsing
for an unknown field. `parse_flags` (absl's `flags_parser` of `app.run`) catches the parse error,
finds the first override naming an unknown field and prints

  error: unknown config field method.mma_weights; did you mean method.mma_weight? (...)

(difflib over the field names at that level), then exits 2, the launchers' status for a config error.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any, Sequence

from absl import flags

CONFIG_ERROR_STATUS = 2


def load_config(spec: str) -> Any:
  """The ConfigDict of a `--config=path.py[:arg]` value (as config_flags loads it)."""
  path, _, arg = spec.partition(':')
  mod_spec = importlib.util.spec_from_file_location('_ml_ecs_cli_config', path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _children(node: Any) -> list[str] | None:
  if hasattr(node, 'keys'):
    return [str(k) for k in node.keys()]
  return None


def unknown_field(cfg: Any, dotted: str) -> str | None:
  """A one-line message if `dotted` (e.g. 'method.mma_weights') names no field of `cfg`, else None."""
  node, parts = cfg, dotted.split('.')
  for i, part in enumerate(parts):
    known = _children(node)
    if known is None:
      return f'config field {".".join(parts[:i])} is a value, not a group: {dotted} does not exist'
    if part not in known:
      parent = '.'.join(parts[:i])
      here = f'{parent}.' if parent else ''
      close = difflib.get_close_matches(part, known, n=3, cutoff=0.6)
      hint = f'; did you mean {" or ".join(here + c for c in close)}?' if close else ''
      msg = f'unknown config field {dotted}{hint} (fields of {parent or "the config"}: {", ".join(sorted(known))})'
      if parent.endswith('encoders'):
        msg += (f'. {parent} is keyed by modality: a new modality needs the whole dict, e.g. '
                f'--config.{parent}="{{\'{part}\': (\'mlp\',), ...the others...}}"')
      return msg
    node = node[part]
  return None


def config_override_errors(argv: Sequence[str], config_flag: str = 'config') -> list[str]:
  """Messages for the `--config.FIELD=...` arguments of `argv` that name no field of the `--config` file."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith(f'--{config_flag}=')), None)
  if spec is None:
    return []
  try:
    cfg = load_config(spec)
  except Exception as e:  # noqa: BLE001  (the config file itself is broken: say so)
    return [f'--{config_flag}={spec} cannot be loaded ({type(e).__name__}: {e})']
  out = []
  for a in argv:
    if a.startswith(f'--{config_flag}.'):
      name = a[len(config_flag) + 3:].split('=', 1)[0]
      msg = unknown_field(cfg, name)
      if msg:
        out.append(msg)
  return out


def packaged_config(spec: str) -> str:
  """`--config` value `spec` ('path.py[:arg]'), or, when that path is no file, the installed configs
  package's file of that name ('tiny', 'tiny.py' or 'configs/tiny.py' -> .../configs/tiny.py), so
  that the installed command works from any directory. Unchanged if neither exists."""
  path, sep, arg = spec.partition(':')
  if os.path.isfile(path):
    return spec
  try:
    import configs
  except ImportError:
    return spec
  name = os.path.basename(path)
  candidate = os.path.join(os.path.dirname(configs.__file__), name if name.endswith('.py') else name + '.py')
  return candidate + sep + arg if os.path.isfile(candidate) else spec


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser`: parses `argv`; a flag or config-field error prints one `error:` line and exits 2."""
  argv = [f'--config={packaged_config(a[9:])}' if a.startswith('--config=') else a for a in argv]
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001  (flags.Error, or ml_collections' AttributeError / KeyError / TypeError)
    errors = config_override_errors(argv[1:])
    text = errors[0] if errors else ' '.join(str(e).split())
    print(f'error: {text}', file=sys.stderr)
    sys.exit(CONFIG_ERROR_STATUS)
