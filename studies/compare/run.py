"""The comparison protocol: headroom check -> tuning -> grid -> reproduction check; resumes every stage.

  python studies/compare/run.py --config=studies/compare/configs/compare.py --workdir=/tmp/compare --max_minutes=100
--stop_after=headroom|tuning|grid ends after that stage (default: all four); the same command without it goes on.
Writes DIR/headroom.json (studies/compare/headroom.py: linear-probe ceilings, the LM check; a benchmark
without headroom stops here with exit 2), DIR/tuning.csv, DIR/tuned.json, DIR/results.csv, DIR/results.md (means and paired
differences with 95% intervals), DIR/rouge_vs_round.png, DIR/rouge_vs_missing_rate.png,
DIR/repro.json, DIR/environment.jsonl, and one run directory per cell under DIR/cells/.
--keep_dir=KEEP (e.g. a folder inside a repository): each finished run's small files and DIR's own files are
copied there as they finish, and a new DIR starts from what KEEP holds (studies/compare/keep.py), so a
comparison run in pieces on machines that do not last goes on from the last finished program.
SIGTERM / Ctrl-C stop after the current round of the running cell (with a checkpoint) and exit
143 / 130 (128 + the signal: a scheduler sees the run did not finish); --max_minutes stops starting
new cells after that long (exit 0). Rerun the same command to go on. Exit 2: a config or workdir
error (one `error:` line), also a cell workdir held by another process.
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))   # the repository root

from absl import app, flags
from ml_collections import config_flags

from studies.compare import grid as compare, headroom, keep, tuning
from ml_ecs.run.compilation_cache import enable_compilation_cache
from ml_ecs.run.runs_trainer import train_runs
from ml_ecs.run.trainer import WorkdirConflict, WorkdirLocked, train
from ml_ecs.config.cli import parse_flags
from ml_ecs.config.validation import ConfigError, DataError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Grid config (studies/compare/configs/compare.py).', lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
_MAX_MINUTES = flags.DEFINE_float('max_minutes', 0.0, 'Start no new cell after this many minutes (0 = no limit).',
                                  lower_bound=0.0)
_STOP_AFTER = flags.DEFINE_enum('stop_after', 'reproduce', ['headroom', 'tuning', 'grid', 'reproduce'],
                                'The last stage to run (e.g. tuning: look at tuned.json before the grid runs); '
                                'a later run of the same command goes on from there.')
_KEEP_DIR = flags.DEFINE_string('keep_dir', None, 'A durable copy of the finished runs and the reports: filled as '
                                'runs finish, and the start of a new workdir (studies/compare/keep.py).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from tqdm import tqdm
  cfg, workdir = _CONFIG.value, _WORKDIR.value
  log = lambda s: tqdm.write(s)
  deadline = time.time() + 60 * _MAX_MINUTES.value if _MAX_MINUTES.value else None
  try:
    compare.check_grid(cfg)
    if 'tune' in cfg:   # before the headroom check runs: a bad tune.draw would stop the tuning after it
      tuning.draw_trials('local', 1, 0, cfg.tune.get('draw', 'stratified'))
  except (ConfigError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  os.makedirs(workdir, exist_ok=True)
  keep_dir = _KEEP_DIR.value
  if keep_dir:
    log(f'{keep.restore(keep_dir, workdir)} files restored from {keep_dir}')
  # Cells share many identical programs (same shapes, same server/eval functions).
  enable_compilation_cache(os.path.join(workdir, 'cache', 'jax'))

  stopped_by: list[str] = []   # the signal that interrupted a cell, if one did

  def run_cell(c, cdir, cache):
    if stopped_by or (deadline is not None and time.time() > deadline):
      return False
    result = train(c, cdir, progress=False, cache_dir=cache, log=lambda s: log('    ' + s))
    if result.status == 'interrupted':
      stopped_by.append(result.signal_name)
    else:
      save()
    return result.status != 'interrupted'

  def run_program(cfgs, cdirs, program_dir, cache, run_batch=None):   # grid.runs_per_program: seeds-only groups
    if stopped_by or (deadline is not None and time.time() > deadline):
      return False
    results = train_runs(cfgs, cdirs, program_dir, cache_dir=cache, log=lambda s: log('    ' + s),
                         run_devices=int(cfg.grid.get('run_devices', 1)),
                         run_batch_size=run_batch or int(cfg.grid.get('run_batch', 0)) or None)
    if results[0].status == 'interrupted':
      stopped_by.append(results[0].signal_name)
    else:
      save()
    return results[0].status != 'interrupted'

  def save() -> None:   # --keep_dir: the finished runs and the reports so far
    if keep_dir:
      keep.save(workdir, keep_dir)

  def status() -> int:   # 128 + N after signal N (the cell's checkpoint is written), else 0
    return 128 + int(getattr(signal, stopped_by[0])) if stopped_by else 0

  try:
    return _stages(cfg, workdir, run_cell, run_program, deadline, stopped_by, status, log, save,
                   _STOP_AFTER.value)
  finally:
    save()


def _stages(cfg, workdir, run_cell, run_program, deadline, stopped_by, status, log, save,
            stop_after: str = 'reproduce') -> int:
  """Headroom check -> tuning -> grid -> reproduction check, up to `stop_after`; the exit status. `save()`
  after the headroom check and the tuning (the grid's cells save as their programs finish)."""
  def done(stage: str, what: str) -> bool:
    if stop_after == stage:
      print(f'{what} (--stop_after={stage}); rerun without it to go on', flush=True)
    return stop_after == stage

  try:
    if headroom.run_checks(cfg, workdir, run_cell, log=log) is None:
      print('headroom check stopped; rerun the same command to go on', flush=True)
      return status()
    save()
    if done('headroom', f'headroom check done: {workdir}/headroom.json'):
      return 0
    if 'tune' in cfg and cfg.tune.trials > 0 and not cfg.grid.tuned:
      tuned = tuning.run_tuning(cfg, workdir, run_cell, log=log, train_many=run_program)
      if tuned is None:
        print('tuning stopped; rerun the same command to go on', flush=True)
        return status()
      cfg.grid.tuned = os.path.join(workdir, 'tuned.json')
      save()
    if done('tuning', f'tuning done: {workdir}/tuning.csv, tuned.json'):
      return 0
    results = compare.run_grid(cfg, workdir, run_cell, log=log, progress=True, deadline=deadline,
                               train_many=run_program)
    if len(results) < len(compare.cells(cfg.grid)):
      print(f'{len(results)} of {len(compare.cells(cfg.grid))} cells done; rerun the same command to go on')
      return status()
    if done('grid', f'grid done: {workdir}/results.csv, results.md and plots'):
      return 0
    if cfg.grid.get('reproduce', 0):
      compare.reproduce(cfg, workdir, run_cell, cfg.grid.reproduce, log=log, train_many=run_program)
      compare.write_reports(results, workdir, cfg.grid)
  except (ConfigError, DataError, WorkdirConflict, WorkdirLocked, FileNotFoundError, headroom.NoHeadroom) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if stopped_by:   # stopped during the reproduction check
    print(f'stopped by {stopped_by[0]}; rerun the same command to go on', flush=True)
    return status()
  print(f'grid complete: {workdir}/results.csv, results.md and plots', flush=True)
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
