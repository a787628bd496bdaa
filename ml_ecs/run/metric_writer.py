"""TensorBoard event files for a run: every numeric metric of a metrics row, and the config as text.

Uses tensorboardX (no TensorFlow, no torch): its own protobuf event writer, ~0.7 MB on top of
the protobuf and numpy we already install. View with `tensorboard --logdir WORKDIR/tensorboard`.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any, Mapping

LOGDIR = 'tensorboard'


def flatten_row(row: Mapping[str, Any], prefix: str = '') -> tuple[dict[str, float], dict[str, str]]:
  """Splits a metrics row into scalars and texts, nested dicts joined with '/'.

  `{'client/rougeLsum': {'0': 0.4}}` gives the scalar `client/rougeLsum/0`. Bools and numbers
  (Python or numpy) are scalars; strings are texts; NaN/inf, None, lists and other values are
  dropped (TensorBoard draws no point for them; metrics.jsonl keeps them).
  """
  scalars: dict[str, float] = {}
  texts: dict[str, str] = {}
  for key, value in row.items():
    tag = f'{prefix}{key}'
    if isinstance(value, Mapping):
      s, t = flatten_row(value, prefix=f'{tag}/')
      scalars.update(s)
      texts.update(t)
    elif isinstance(value, str):
      texts[tag] = value
    elif isinstance(value, numbers.Real) or (hasattr(value, 'ndim') and getattr(value, 'ndim') == 0):
      try:
        v = float(value)
      except (TypeError, ValueError):
        continue
      if math.isfinite(v):
        scalars[tag] = v
  return scalars, texts


class MetricWriter:
  """Writes metrics rows and the config of a run as TensorBoard events under `workdir/tensorboard/`.

  Usage (the trainer, once per round):
    writer = MetricWriter(workdir)
    writer.write_config(cfg)            # a dict, JSON text or ml_collections.ConfigDict
    writer.write_row(row['round'], row) # every numeric scalar of the row, strings as text
    writer.close()
  `purge_step`: on a resumed run, hides the events of an earlier attempt at steps >= it.
  """

  def __init__(self, workdir: str, step_key: str = 'round', purge_step: int | None = None,
               flush_every_row: bool = True):
    from tensorboardX import SummaryWriter  # imported here: plotting/reports need no writer
    self.logdir = os.path.join(workdir, LOGDIR)
    os.makedirs(self.logdir, exist_ok=True)
    self.step_key = step_key
    self.flush_every_row = flush_every_row
    self._writer = SummaryWriter(logdir=self.logdir, purge_step=purge_step, flush_secs=30)

  def write_row(self, step: int, row: Mapping[str, Any]) -> None:
    """Every finite numeric scalar of `row` (except the step key itself) at `step`; strings as text."""
    scalars, texts = flatten_row({k: v for k, v in row.items() if k != self.step_key})
    for tag, value in scalars.items():
      self._writer.add_scalar(tag, value, global_step=int(step))
    for tag, text in texts.items():
      self._writer.add_text(tag, text, global_step=int(step))
    if self.flush_every_row:
      self._writer.flush()

  def write_config(self, config: Any, step: int = 0) -> None:
    """The config as indented JSON text under the tag `config`."""
    if hasattr(config, 'to_json_best_effort'):  # ml_collections.ConfigDict
      config = json.loads(config.to_json_best_effort())
    if isinstance(config, str):
      config = json.loads(config)
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    self._writer.add_text('config', f'```\n{text}\n```', global_step=step)
    self._writer.flush()

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
