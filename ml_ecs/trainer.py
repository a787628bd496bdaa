"""The main job: build a federation, run its rounds, write metrics, summary and checkpoints."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import ml_collections
from tqdm import tqdm

from ml_ecs import metrics_io
from ml_ecs.checkpoint import Checkpointer
from ml_ecs.federation import Federation


def round_line(row: dict[str, Any]) -> str:
  """One readable line for a round's metrics."""
  parts = [f"round {row['round']:>3}"]
  if 'client/private_lm' in row:
    parts.append(f"lm c={row['client/private_lm']:.3f} s={row['server/lm']:.3f}")
  if 'server/rougeLsum' in row:
    parts.append(f"rougeLsum c={row['client/rougeLsum_mean']:.3f} s={row['server/rougeLsum']:.3f}")
    parts.append(f"acc c={row['client/accuracy_mean']:.2f} s={row['server/accuracy']:.2f}")
  if 'comm/bytes_up' in row:
    parts.append(f"up={row['comm/bytes_up'] / 1e3:.0f}kB ratio={row['comm/ratio']:.4%}")
  if 'time/round_s' in row:
    parts.append(f"{row['time/round_s']:.1f}s")
  return ' | '.join(parts)


def train(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True,
          log: Callable[[str], None] | None = None, checkpoint: bool = True,
          cache_dir: str | None = None) -> list[dict[str, Any]]:
  """Runs `cfg.train.rounds` rounds; evaluates at round 0, every `eval_every` rounds and at the end.

  Writes workdir/config.json, metrics.jsonl (one object per evaluated round),
  summary.json, model_summary.json and checkpoints/ (orbax, last 2 evaluated rounds).
  """
  os.makedirs(workdir, exist_ok=True)
  log = log or (lambda s: tqdm.write(s))
  metrics_io.write_json(os.path.join(workdir, 'config.json'), json.loads(cfg.to_json_best_effort()))
  t0 = time.perf_counter()
  fed = Federation(cfg, workdir=workdir, log=log, cache_dir=cache_dir)
  setup_s = time.perf_counter() - t0
  metrics_io.write_json(os.path.join(workdir, 'model_summary.json'),
                        {**fed.model_summary(), 'pretrain': fed.pretrain_info, 'setup_s': setup_s})
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints')) if checkpoint else None
  rows: list[dict[str, Any]] = []
  row = {**fed.evaluate(), 'time/setup_s': setup_s}
  rows.append(row)
  log(round_line(row))
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  metrics_io.write_jsonl(metrics_path, rows)
  rounds = cfg.train.rounds
  bar = tqdm(range(1, rounds + 1), desc=f'{cfg.method.name}', unit='round', disable=not progress,
             dynamic_ncols=True)
  for r in bar:
    row = fed.run_round()
    if r % cfg.train.eval_every == 0 or r == rounds:
      row.update(fed.evaluate())
      row['time/elapsed_s'] = time.perf_counter() - t0
      rows.append(row)
      metrics_io.write_jsonl(metrics_path, rows)
      if ckpt is not None:
        ckpt.save(r, fed.state())
      bar.set_postfix(c=f"{row['client/rougeLsum_mean']:.3f}", s=f"{row['server/rougeLsum']:.3f}")
    log(round_line(row))
  bar.close()
  if ckpt is not None:
    ckpt.close()
  summary = {**metrics_io.summarize(rows), 'rounds': rounds, 'wall_s': time.perf_counter() - t0,
             'method': cfg.method.name}
  metrics_io.write_json(os.path.join(workdir, 'summary.json'), summary)
  return rows
