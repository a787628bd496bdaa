"""Many federations as one job: `train_runs` trains R runs of one structure as one program
(ml_ecs.core.runs) and writes each run's directory as the main job writes it (config.json,
metrics.jsonl, timing.jsonl, TensorBoard events, model_summary.json, clients.json, summary.json), so
whatever reads runs (the comparison's statistics and reports) reads these too, plus program.json: the
run's position among the program's R runs, the names of all of them and how many it computed at once
(`run_batch`; the program rounds some sums differently from a single run, so a run is reproduced bit for bit
only by rerunning its program as it ran).

The program's checkpoints (every run's state on the run axis, with every run's metric rows) are kept
in one `program_dir`; rerunning the same call resumes all the runs from the newest valid one. SIGTERM
and Ctrl-C stop after the current round, with a checkpoint. One process; state on its devices.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Callable

import ml_collections

from ml_ecs.config.identity import config_differences, identity
from ml_ecs.core import faults, runs as runs_lib
from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.run import metrics_io
from ml_ecs.run.checkpoint import Checkpointer
from ml_ecs.run.metric_writer import MetricWriter
from ml_ecs.run.trainer import (RunResult, WorkdirConflict, _check_workdir, _split_timing, _StopOnSignal,
                                checked_dataset, config_dict, make_workdir, round_line,
                                run_summary, write_setup_files)
from ml_ecs.run.workdir_lock import WorkdirLock


def _stop(writers: Sequence[MetricWriter], ckpt: Checkpointer | None) -> None:
  for w in writers:
    w.close()
  if ckpt is not None:
    ckpt.close()


def train_runs(cfgs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str], program_dir: str, *,
               log: Callable[[str], None] = print, checkpoint: bool = True, cache_dir: str | None = None,
               dataset: MultimodalDataset | None = None, run_devices: int = 1,
               run_batch_size: int | None = None) -> list[RunResult]:
  """Runs (or resumes) R runs as one program; configs may differ only in `ml_ecs.core.runs.RUN_FIELDS`
  (all share `train.rounds`, `eval_every` and `checkpoint_every`). A run whose directory already holds
  its finished run is refused: leave it out of `cfgs`. `run_devices`: split the run axis over that many
  devices; `run_batch_size`: runs computed at once (None: the platform's default) (`ml_ecs.core.runs.init`)."""
  if len(cfgs) != len(workdirs) or len(set(map(os.path.abspath, workdirs))) != len(workdirs):
    raise ValueError(f'{len(cfgs)} configs need as many distinct workdirs, got {list(workdirs)}')
  runs_lib.check_configs(cfgs)
  dataset = checked_dataset(cfgs[0], dataset, log)
  for cfg in cfgs[1:]:
    checked_dataset(cfg, dataset, lambda s: None)
  locks = []
  try:
    for w in [*workdirs, program_dir]:
      make_workdir(w)
      locks.append(WorkdirLock(w, log))
      locks[-1].acquire()
    return _train_runs(cfgs, list(workdirs), program_dir, dataset, log, checkpoint, cache_dir, run_devices,
                       run_batch_size)
  finally:
    for lock in locks:
      lock.release()


def _train_runs(cfgs, workdirs, program_dir, dataset, log, checkpoint, cache_dir, run_devices, run_batch_size
                ) -> list[RunResult]:
  R, train = len(cfgs), cfgs[0].train
  cfg_jsons = [config_dict(c) for c in cfgs]
  for w, cj in zip(workdirs, cfg_jsons):
    if _check_workdir(w, cj, False, log):
      raise WorkdirConflict(f'{w} holds a finished run of its config: leave it out of the program')
    metrics_io.write_json(os.path.join(w, 'config.json'), cj)
  t0 = time.perf_counter()
  runs, state = runs_lib.init(cfgs, workdirs, dataset, log, cache_dir, run_devices, run_batch_size)
  mesh = runs.setups[0].mesh
  for r, w in enumerate(workdirs):   # which program a run ran in: reproducing it means rerunning that program
    metrics_io.write_json(os.path.join(w, 'program.json'), {
        'runs': R, 'position': r, 'members': [os.path.basename(os.path.normpath(x)) for x in workdirs],
        'mesh': {k: int(v) for k, v in mesh.shape.items()}, 'run_batch': runs.batch})
  setup_s = time.perf_counter() - t0
  for w, s, v in zip(workdirs, runs.setups, runs_lib.views(state, cohorts=True)):
    write_setup_files(w, s, v, setup_s)
  ckpt = Checkpointer(os.path.join(program_dir, 'checkpoints'), train.keep_checkpoints) if checkpoint else None
  resumed_from = None
  rows: list[list[dict[str, Any]]] = [[] for _ in range(R)]
  timings: list[list[dict[str, Any]]] = [[] for _ in range(R)]
  if ckpt is not None:
    found = ckpt.restore_latest_valid(state, log)
    if found is not None:
      resumed_from, state, meta = found
      saved = meta.get('configs', [])
      diff = ([f'runs: {len(saved)} saved, {R} now'] if len(saved) != R else
              [f'run {r}: {d}' for r in range(R) for d in config_differences(identity(saved[r]), identity(cfg_jsons[r]))])
      if diff:
        raise WorkdirConflict(f'checkpoint {ckpt.step_dir(resumed_from)} holds runs with other configs '
                              f'({"; ".join(diff)}); use another program directory')
      rows = meta['rows']
      for r, w in enumerate(workdirs):   # wall-clock times only: a damaged file loses them, not the run
        try:
          timings[r] = [t for t in metrics_io.read_jsonl(os.path.join(w, 'timing.jsonl')) if t['round'] <= resumed_from]
        except (OSError, ValueError, KeyError, TypeError):
          pass
        timings[r].append({'round': resumed_from, 'event': 'resumed', 'time/setup_s': setup_s})
      log(f'resuming {R} runs from round {resumed_from} (checkpoint {ckpt.step_dir(resumed_from)})')
  if resumed_from is None:
    for r, ev in enumerate(runs_lib.evaluate(runs, state, cfgs[0].eval.split)):
      row, timing = _split_timing(ev)
      rows[r].append(row)
      timings[r].append({'round': 0, **timing, 'time/setup_s': setup_s, 'time/runs': R})
  writers = [MetricWriter(w, purge_step=None if resumed_from is None else resumed_from + 1) for w in workdirs]
  if resumed_from is None:
    for r, w in enumerate(writers):
      w.write_config(cfg_jsons[r])
      w.write_row(0, {**rows[r][0], **timings[r][0]})

  def write(r):
    metrics_io.write_jsonl(os.path.join(workdirs[r], 'metrics.jsonl'), rows[r])
    metrics_io.write_jsonl(os.path.join(workdirs[r], 'timing.jsonl'), timings[r])

  for r in range(R):
    write(r)
  rounds, every = train.rounds, train.checkpoint_every
  saved_at = resumed_from
  with _StopOnSignal(log) as stop:
    for rnd in range(int(state.round[0]) + 1, rounds + 1):
      state, new = runs_lib.run_round(runs, state)
      if rnd % train.eval_every == 0 or rnd == rounds:
        full = rnd == rounds and bool(cfgs[0].eval.get('final_full', False))
        for row, ev in zip(new, runs_lib.evaluate(runs, state, cfgs[0].eval.split, full)):
          row.update(ev)
      for r, row in enumerate(new):
        row, timing = _split_timing(row)
        rows[r].append(row)
        timings[r].append({'round': rnd, **timing, 'time/elapsed_s': time.perf_counter() - t0})
        write(r)
        writers[r].write_row(rnd, {**row, **timings[r][-1]})
      log(f'{R} runs: ' + round_line(rows[0][-1]))
      try:   # before any save: a diverged federation's state is never checkpointed
        for r in range(R):
          faults.check_round(rows[r][-1])
      except faults.FederationDiverged as e:
        _stop(writers, ckpt)
        raise faults.FederationDiverged(f'run {r} ({workdirs[r]}): {e}') from None
      if ckpt is not None and (rnd == rounds or (every and rnd % every == 0) or stop.received):
        ckpt.save(rnd, state, {'round': rnd, 'rows': rows, 'configs': cfg_jsons, 'workdirs': list(workdirs)})
        saved_at = rnd
      if stop.received and rnd < rounds:
        _stop(writers, ckpt)
        log(f'stopped by {stop.received} after round {rnd}; checkpoint at round {saved_at}. '
            'Rerun the same command to resume.')
        return [RunResult('interrupted', rows[r], workdirs[r], resumed_from, stop.received) for r in range(R)]
  _stop(writers, ckpt)
  for r, (cfg, s, w) in enumerate(zip(cfgs, runs.setups, workdirs)):
    metrics_io.write_json(os.path.join(w, 'summary.json'), run_summary(cfg, s, rows[r]))
  return [RunResult('complete', rows[r], workdirs[r], resumed_from) for r in range(R)]
