"""Results files written atomically (temp file + rename): a crash never leaves a torn file."""
from __future__ import annotations

import json
import math
import os
from typing import Any


def write_json(path: str, obj: Any) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
    f.write('\n')
  os.replace(tmp, path)


def write_jsonl(path: str, rows: list[dict]) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    for row in rows:
      f.write(json.dumps(row, sort_keys=True, default=float) + '\n')
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


SUMMARY_KEYS = ('server/rougeLsum', 'client/rougeLsum_mean', 'server/accuracy', 'client/accuracy_mean',
                'comm/ratio')


def summarize(rows: list[dict]) -> dict[str, Any]:
  """First, best and final value of the headline metrics over evaluated rounds."""
  out: dict[str, Any] = {}
  evaluated = [r for r in rows if 'server/rougeLsum' in r]
  for key in SUMMARY_KEYS:
    vals = [(r['round'], r[key]) for r in evaluated if key in r and not (isinstance(r[key], float) and math.isnan(r[key]))]
    if not vals:
      continue
    best_round, best = max(vals, key=lambda v: v[1]) if key != 'comm/ratio' else min(vals, key=lambda v: v[1])
    out[key] = {'first': vals[0][1], 'final': vals[-1][1], 'best': best, 'best_round': best_round,
                'first_round': vals[0][0], 'final_round': vals[-1][0]}
  return out
