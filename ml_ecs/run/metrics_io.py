"""Results files written atomically (temp file + rename): a crash never leaves a torn file.

The files are strict JSON: NaN and +-Inf (a diverged client's loss, an empty mean) are written
as `null`, never as the bare `NaN` / `Infinity` tokens that other JSON readers refuse. Temp
files are named per process and thread (`NAME.<pid>.<thread>.tmp`), so two writers never share one.
"""
from __future__ import annotations

import json
import math
import os
import threading
from typing import Any


def temp_name(path: str) -> str:
  """A temp file name next to `path` that no other process or thread uses."""
  return f'{path}.{os.getpid()}.{threading.get_ident()}.tmp'


def strict(obj: Any) -> Any:
  """`obj` with every non-finite float (also numpy scalars) replaced by None, containers recursed."""
  if isinstance(obj, dict):
    return {k: strict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict(v) for v in obj]
  if isinstance(obj, float) or (hasattr(obj, 'dtype') and getattr(obj, 'ndim', 1) == 0
                                and getattr(obj.dtype, 'kind', '') == 'f'):
    v = float(obj)
    return v if math.isfinite(v) else None
  return obj


def dumps(obj: Any, **kw) -> str:
  """Strict JSON text of `obj` (non-finite floats as null; numpy scalars as numbers)."""
  return json.dumps(strict(obj), sort_keys=True, default=float, allow_nan=False, **kw)


def write_json(path: str, obj: Any) -> None:
  tmp = temp_name(path)
  with open(tmp, 'w') as f:
    f.write(dumps(obj, indent=2) + '\n')
  os.replace(tmp, path)


def write_jsonl(path: str, rows: list[dict]) -> None:
  tmp = temp_name(path)
  with open(tmp, 'w') as f:
    for row in rows:
      f.write(dumps(row) + '\n')
  os.replace(tmp, path)


def nan_for_null(obj: Any) -> Any:
  """`obj` with every null as NaN (what `strict` wrote as null), containers recursed."""
  if obj is None:
    return math.nan
  if isinstance(obj, dict):
    return {k: nan_for_null(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [nan_for_null(v) for v in obj]
  return obj


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSONL file; `null` (a non-finite value on disk) comes back as NaN, as it was
  written. A line that is not JSON raises ValueError naming the file and line."""
  rows = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(nan_for_null(json.loads(line)))
        except ValueError as e:
          raise ValueError(f'{path} line {i} is not JSON ({e})') from None
  return rows


SUMMARY_KEYS = ('server/rougeLsum', 'client/rougeLsum_mean', 'server/accuracy', 'client/accuracy_mean',
                'comm/ratio')


def summarize(rows: list[dict]) -> dict[str, Any]:
  """First, best and final value of the headline metrics over evaluated rounds."""
  out: dict[str, Any] = {}
  evaluated = [r for r in rows if 'server/rougeLsum' in r]
  for key in SUMMARY_KEYS:
    vals = [(r['round'], r[key]) for r in evaluated
            if key in r and r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
    if not vals:
      continue
    best_round, best = max(vals, key=lambda v: v[1]) if key != 'comm/ratio' else min(vals, key=lambda v: v[1])
    out[key] = {'first': vals[0][1], 'final': vals[-1][1], 'best': best, 'best_round': best_round,
                'first_round': vals[0][0], 'final_round': vals[-1][0]}
  return out
