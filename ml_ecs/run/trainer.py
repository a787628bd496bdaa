"""The main job: init a federation, run its rounds, write metrics, summary and checkpoints; resume.

A workdir holds one run. Rerunning the same command on it continues from the newest
valid checkpoint (state, RNG and metric rows), so a killed or preempted run loses at
most `train.checkpoint_every` rounds and ends with the same metrics.jsonl and
summary.json as an uninterrupted run. A finished run is never overwritten unless
asked (`overwrite=True`); a run with a different config is refused, naming the fields.
SIGTERM and Ctrl-C stop the run at the end of the current round, after a checkpoint.
With several processes (ml_ecs.core.distributed) every process runs `train`; process 0 alone writes
the run's files and logs, each process writes its shards of the checkpoints and its own
record `hosts/process_<i>.json` (the clients and bytes it holds), and a signal to any process
stops all of them after the same round.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
from tqdm import tqdm

from ml_ecs.core import distributed, faults, federation
from ml_ecs.run import metrics_io
from ml_ecs.aggregation import privacy
from ml_ecs.run.checkpoint import Checkpointer, checkpoint_config, checkpoint_steps
from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.data.loaders import load_dataset
from ml_ecs.run.metric_writer import MetricWriter
from ml_ecs.run.workdir_lock import WorkdirLock, WorkdirLocked
from ml_ecs.algorithms.registry import strategy_overrides
from ml_ecs.config.identity import config_differences, identity  # noqa: F401  (config_differences: re-exported)
from ml_ecs.config.validation import DataError, check_devices, check_partition, validate

# Files of a run that `overwrite` removes (caches such as backbones/ stay).
RUN_OUTPUTS = ('config.json', 'metrics.jsonl', 'timing.jsonl', 'summary.json', 'model_summary.json',
               'clients.json', 'tokenizer.json', 'checkpoints', 'checkpoints_damaged', 'tensorboard', 'hosts')


class _NoWriter:
  """The TensorBoard writer of a process that writes no events (not process 0)."""

  def write_config(self, cfg: Any) -> None:
    pass

  def write_row(self, step: int, row: dict[str, Any]) -> None:
    pass

  def close(self) -> None:
    pass


class WorkdirConflict(RuntimeError):
  """The workdir holds a run of another config (or one whose config cannot be told)."""


__all__ = ['RunResult', 'WorkdirConflict', 'WorkdirLocked', 'train']


@dataclasses.dataclass
class RunResult:
  """How a call of `train` ended: 'complete', 'already_complete' or 'interrupted' (by a signal)."""
  status: str
  rows: list[dict[str, Any]]
  workdir: str
  resumed_from: int | None = None
  signal_name: str | None = None


def round_line(row: dict[str, Any]) -> str:
  """One readable line for a round's metrics."""
  parts = [f"round {row['round']:>3}"]
  if 'client/private_lm' in row:
    parts.append(f"lm c={row['client/private_lm']:.3f} s={row['server/lm']:.3f}")
  if 'server/rougeLsum' in row:
    n = f" ({row['client/evaluated']} clients)" if 'client/evaluated' in row else ''
    parts.append(f"rougeLsum c={row['client/rougeLsum_mean']:.3f}{n} s={row['server/rougeLsum']:.3f}")
    parts.append(f"acc c={row['client/accuracy_mean']:.2f} s={row['server/accuracy']:.2f}")
  if 'comm/bytes_up' in row:
    parts.append(f"up={row['comm/bytes_up'] / 1e3:.0f}kB ratio={row['comm/ratio']:.4%}")
  return ' | '.join(parts)


def fault_lines(row: dict[str, Any]) -> list[str]:
  """Log lines for the faults of a round: diverged, re-synced and rejected clients."""
  r, out = row['round'], []
  if row.get('clients/resynced_ids'):
    out.append(f"round {r}: re-synced diverged clients {row['clients/resynced_ids']} from the global model "
               '(shared LoRA = global, private parts re-initialised, optimizer reset)')
  if row.get('clients/diverged_ids'):
    out.append(f"round {r}: clients {row['clients/diverged_ids']} diverged (non-finite); excluded from "
               'aggregation and client means, re-synced next round')
  if row.get('client/diverged_ids'):
    out.append(f"round {r}: evaluation left out diverged clients {row['client/diverged_ids']}")
  if row.get('agg/rejected_ids'):
    out.append(f"round {r}: rejected the updates of clients {row['agg/rejected_ids']} as norm outliers")
  return out


def config_dict(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON values (what config.json holds)."""
  return json.loads(cfg.to_json_best_effort())


def _split_timing(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(deterministic metrics, wall-clock timings) of a row."""
  timing = {k: v for k, v in row.items() if k.startswith('time/')}
  return {k: v for k, v in row.items() if not k.startswith('time/')}, timing


def _check_workdir(workdir: str, cfg_json: dict[str, Any], overwrite: bool, log: Callable[[str], None]) -> bool:
  """Prepares `workdir`; returns True if it holds a finished run of this config."""
  if overwrite and not distributed.is_main():
    return False   # process 0 clears the workdir
  if overwrite:
    for name in RUN_OUTPUTS:
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    return False
  cfg_path = os.path.join(workdir, 'config.json')
  finished = os.path.exists(os.path.join(workdir, 'summary.json'))
  saved, source = None, None
  if os.path.exists(cfg_path):
    try:
      with open(cfg_path) as f:
        saved, source = json.load(f), 'config.json'
    except ValueError as e:
      log(f'WARNING: {cfg_path} is not valid JSON ({e}); checking the config saved in the checkpoints instead')
  if saved is None:   # config.json lost or damaged: every checkpoint holds the config too
    step, saved = checkpoint_config(os.path.join(workdir, 'checkpoints'))
    source = f'checkpoint {step}' if saved is not None else None
  if saved is not None:
    diff = config_differences(identity(saved), identity(cfg_json))
    if diff:
      raise WorkdirConflict(
          f'{workdir} holds a run with a different config (fields differ: {", ".join(diff)}; '
          f'from its {source}); use another --workdir, or --overwrite to start afresh there')
  elif finished or checkpoint_steps(os.path.join(workdir, 'checkpoints')):
    raise WorkdirConflict(
        f'{workdir} holds a run but neither its config.json nor a checkpoint says which config; '
        'use another --workdir, or --overwrite to start afresh there')
  return finished


class _StopOnSignal:
  """Turns SIGTERM / SIGINT into a request to stop after the current round (a second Ctrl-C kills)."""

  def __init__(self, log: Callable[[str], None]):
    self.log = log
    self.received: str | None = None
    self.previous: dict[int, Any] = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self.previous[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not the main thread: signals stay as they are
        pass
    return self

  def _handle(self, signum, frame):
    if self.received and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    self.log(f'received {self.received}: stopping after the current round (checkpoint, then exit)')

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


def _recorded_execution(workdir: str) -> dict | None:
  """The execution choices (e.g. the measured convolution per cohort) this workdir's run made when it
  started (model_summary.json), so that a resumed run computes as the first process did; None if none."""
  try:
    with open(os.path.join(workdir, 'model_summary.json')) as f:
      return json.load(f).get('execution')
  except (OSError, ValueError, AttributeError):
    return None


def train(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          log: Callable[[str], None] | None = None, checkpoint: bool = True, cache_dir: str | None = None,
          overwrite: bool = False, dataset: MultimodalDataset | None = None,
          backbone_cache: str | None = None) -> RunResult:
  """Runs (or resumes) `cfg.train.rounds` rounds in `workdir`.

  Evaluates at round 0, every `train.eval_every` rounds and at the end; checkpoints every
  `train.checkpoint_every` rounds and at the end. Writes config.json, metrics.jsonl (one row
  per round: training metrics, plus evaluation metrics on evaluated rounds), timing.jsonl
  (wall-clock times per round), TensorBoard events (tensorboard/: both, and the config),
  summary.json, model_summary.json, clients.json and checkpoints/ (orbax). `dataset` replaces the config's data source.
  Pretrained backbones are kept in (cache_dir or workdir)/backbones, and in backbone_cache/backbones (a
  folder shared by later runs) when given.
  """
  main = distributed.is_main()
  log = (log or (lambda s: tqdm.write(s))) if main else (lambda s: None)   # process 0 logs for all
  write_json = metrics_io.write_json if main else (lambda path, obj: None)
  write_jsonl = metrics_io.write_jsonl if main else (lambda path, rows: None)
  dataset = checked_dataset(cfg, dataset, log)
  make_workdir(workdir)
  lock = WorkdirLock(workdir, log) if main else None   # process 0 holds it for all processes of the run
  refused = None
  if lock is not None:
    try:
      lock.acquire()
    except WorkdirLocked as e:
      refused, lock = e, None
  if distributed.any_process(refused is not None):   # every process stops, none waits in a collective
    raise refused or WorkdirLocked(f'{workdir}: process 0 could not lock the workdir (its error line names why)')
  try:
    return _train(cfg, workdir, dataset, progress=progress, log=log, checkpoint=checkpoint, cache_dir=cache_dir,
                  overwrite=overwrite, backbone_cache=backbone_cache)
  finally:
    if lock is not None:
      lock.release()


def checked_dataset(cfg: ml_collections.ConfigDict, dataset: MultimodalDataset | None,
                    log: Callable[[str], None]) -> MultimodalDataset:
  """Validates a run's config against the devices and its data (loaded unless given); says what it ignores."""
  validate(cfg)
  check_devices(cfg, jax.device_count(), jax.process_count())
  if dataset is None:
    try:
      dataset = load_dataset(cfg.data)
    except (OSError, ValueError) as e:   # a missing or malformed data file: the loaders name it
      raise DataError(f'data.path = {cfg.data.path!r} ({cfg.data.name}): {e}') from None
  check_partition(cfg, dataset)
  unused = sorted(set(cfg.data.encoders.keys()) - set(dataset.modality_names))
  if unused:
    log(f'WARNING: data.encoders names modalities the dataset does not have: {unused} (ignored; the dataset '
        f'has {list(dataset.modality_names)})')
  differ = strategy_overrides(cfg.method)
  if differ:   # e.g. a Python caller setting method.name without apply_strategy: say what runs
    log(f'note: method {cfg.method.name!r} runs with fields that differ from its plain settings: {differ} '
        '(ml_ecs.algorithms.registry.apply_strategy sets them; the command line applies it and keeps '
        'the method fields you give)')
  return dataset


def make_workdir(workdir: str) -> None:
  """Creates a run directory, or says why it cannot be one."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirConflict(f'--workdir {workdir} is a file, not a directory')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirConflict(f'cannot create --workdir {workdir}: {e.strerror or e}') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirConflict(f'--workdir {workdir} is not writable')


def _train(cfg: ml_collections.ConfigDict, workdir: str, dataset: MultimodalDataset, *, progress: bool,
           log: Callable[[str], None], checkpoint: bool, cache_dir: str | None, overwrite: bool,
           backbone_cache: str | None = None) -> RunResult:
  """`train` once the workdir is locked."""
  main = distributed.is_main()
  write_json = metrics_io.write_json if main else (lambda path, obj: None)
  write_jsonl = metrics_io.write_jsonl if main else (lambda path, rows: None)
  cfg_json = config_dict(cfg)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  complete = _check_workdir(workdir, cfg_json, overwrite, log)
  distributed.barrier('workdir_checked')   # every process has looked before process 0 writes
  if complete:
    log(f'{workdir} holds a complete run of this config ({cfg.train.rounds} rounds): nothing to do '
        '(--overwrite starts it afresh)')
    try:
      rows = metrics_io.read_jsonl(metrics_path)
    except (OSError, ValueError) as e:
      raise WorkdirConflict(f'{workdir} holds summary.json but its metrics.jsonl cannot be read ({e}); '
                            '--overwrite starts the run afresh') from None
    return RunResult('already_complete', rows, workdir)
  write_json(os.path.join(workdir, 'config.json'), cfg_json)

  t0 = time.perf_counter()
  setup, state = federation.init(cfg, workdir=workdir, dataset=dataset, log=log, cache_dir=cache_dir,
                                 recorded=_recorded_execution(workdir), backbone_cache=backbone_cache)
  setup_s = time.perf_counter() - t0
  sets = cfg.data.get('modality_sets', ())
  if sets and len(setup.cohorts) > len({tuple(sorted(s)) for s in sets}):
    log(f'WARNING: data.modality_sets lists {len({tuple(sorted(s)) for s in sets})} distinct modality sets but the '
        f'clients form {len(setup.cohorts)} cohorts: with explicit sets, client k takes option k mod n of each '
        'data.encoders entry (num_device_types is not used), so clients of one set got different encoders '
        '(clients.json lists them); give one encoder per modality to make each set one cohort')
  write_setup_files(workdir, setup, state, setup_s)
  if jax.process_count() > 1:
    os.makedirs(os.path.join(workdir, 'hosts'), exist_ok=True)
    metrics_io.write_json(os.path.join(workdir, 'hosts', f'process_{jax.process_index()}.json'),
                          federation.process_holdings(setup, state))
  every = cfg.train.checkpoint_every
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.train.keep_checkpoints) if checkpoint else None
  rows: list[dict[str, Any]] = []
  timings: list[dict[str, Any]] = []
  resumed_from = None
  timing_path = os.path.join(workdir, 'timing.jsonl')
  if ckpt is not None:
    found = ckpt.restore_latest_valid(state, log)
    if found is not None:
      resumed_from, state, meta = found
      diff = config_differences(identity(meta['config']), identity(cfg_json)) if 'config' in meta else []
      if diff:
        raise WorkdirConflict(
            f'checkpoint {ckpt.step_dir(resumed_from)} holds a run with a different config (fields differ: '
            f'{", ".join(diff)}); use another --workdir, or --overwrite to start afresh there')
      rows = meta['rows']
      try:   # wall-clock times only: a damaged file loses them, not the run
        timings = [t for t in metrics_io.read_jsonl(timing_path) if t['round'] <= resumed_from]
      except FileNotFoundError:
        pass
      except (OSError, ValueError, KeyError, TypeError) as e:
        log(f'WARNING: {timing_path} cannot be read ({e}); its earlier wall-clock times are dropped')
      timings.append({'round': resumed_from, 'event': 'resumed', 'time/setup_s': setup_s})
      log(f'resuming from round {resumed_from} (checkpoint {ckpt.step_dir(resumed_from)})')
  if resumed_from is None:
    row, timing = _split_timing(federation.evaluate(setup, state, cfg.eval.split))
    rows.append(row)
    timings.append({'round': 0, **timing, 'time/setup_s': setup_s})
    log(round_line(row))
  write_jsonl(metrics_path, rows)
  write_jsonl(timing_path, timings)
  # TensorBoard: a resumed run drops the earlier attempt's points after its checkpoint.
  writer = (MetricWriter(workdir, purge_step=None if resumed_from is None else resumed_from + 1) if main
            else _NoWriter())
  if resumed_from is None:
    writer.write_config(cfg_json)
    writer.write_row(0, {**rows[0], **timings[0]})

  rounds = cfg.train.rounds
  start = int(state.round)
  bar = tqdm(total=rounds, initial=start, desc=cfg.method.name, unit='round', disable=not (progress and main),
             dynamic_ncols=True)
  saved_at = resumed_from
  with _StopOnSignal(log) as stop:
    for r in range(start + 1, rounds + 1):
      state, row = federation.run_round(setup, state)
      if r % cfg.train.eval_every == 0 or r == rounds:
        row.update(federation.evaluate(setup, state, cfg.eval.split,
                                       full=r == rounds and bool(cfg.eval.get('final_full', False))))
        bar.set_postfix(c=f"{row['client/rougeLsum_mean']:.3f}", s=f"{row['server/rougeLsum']:.3f}")
      for line in fault_lines(row):
        log(line)
      row, timing = _split_timing(row)
      rows.append(row)
      timings.append({'round': r, **timing, 'time/elapsed_s': time.perf_counter() - t0})
      write_jsonl(metrics_path, rows)
      write_jsonl(timing_path, timings)
      writer.write_row(r, {**row, **timings[-1]})
      if distributed.any_process(stop.received is not None) and not stop.received:
        stop.received = 'SIGTERM'   # another process was signalled: stop with it
      log(round_line(row))
      bar.update(1)
      try:   # before any save: the state of a diverged federation is never checkpointed
        faults.check_round(row)
      except faults.FederationDiverged:
        bar.close()
        writer.close()
        if ckpt is not None:
          ckpt.close()
        raise
      if ckpt is not None and (r == rounds or (every and r % every == 0) or stop.received):
        ckpt.save(r, state, {'round': r, 'rows': rows, 'config': cfg_json})
        saved_at = r
      if stop.received and r < rounds:
        bar.close()
        writer.close()
        if ckpt is not None:
          ckpt.close()
        log(f'stopped by {stop.received} after round {r}; checkpoint at round {saved_at}. '
            'Rerun the same command to resume.')
        return RunResult('interrupted', rows, workdir, resumed_from, stop.received)
  bar.close()
  writer.close()
  if ckpt is not None:
    ckpt.close()
  write_json(os.path.join(workdir, 'summary.json'), run_summary(cfg, setup, rows))
  return RunResult('complete', rows, workdir, resumed_from)


def run_summary(cfg: ml_collections.ConfigDict, setup: federation.Setup, rows: list[dict[str, Any]]) -> dict[str, Any]:
  """summary.json of a finished run."""
  rounds = cfg.train.rounds
  summary = {**metrics_io.summarize(rows), 'rounds': rounds, 'method': cfg.method.name,
             'method_overrides': strategy_overrides(cfg.method),
             'floors': federation.floors(setup)}   # constant answers on the same test windows
  if cfg.dp.enabled:
    q = setup.sampling_rate
    summary['dp'] = {'epsilon': privacy.epsilon(cfg.dp, q, rounds), 'sampling_rate': q,
                     'sampling': 'fixed k of n per cohort, accounted as Poisson at q = max k/n',
                     'delta': float(cfg.dp.delta), 'noise_multiplier': float(cfg.dp.noise_multiplier),
                     'clip_norm': float(cfg.dp.clip_norm), 'accountant': cfg.dp.accountant,
                     'representations_noised': bool(cfg.dp.noise_representations)}
  return summary


def write_setup_files(workdir: str, setup: federation.Setup, state: federation.State, setup_s: float) -> None:
  """model_summary.json and clients.json of a run. Every process computes them (reading a sharded state is
  a collective: all processes take part); process 0 writes them."""
  summary = {**federation.model_summary(setup, state), 'pretrain': setup.pretrain_info, 'setup_s': setup_s}
  clients = federation.clients_info(setup)
  if distributed.is_main():
    metrics_io.write_json(os.path.join(workdir, 'model_summary.json'), summary)
    metrics_io.write_json(os.path.join(workdir, 'clients.json'), clients)
