"""The comparison protocol: tuning -> grid -> reproduction check; resumes every stage.

  python studies/compare/run.py --config=studies/compare/configs/compare.py --workdir=/tmp/compare --max_minutes=100
Writes DIR/tuning.csv, DIR/tuned.json, DIR/results.csv, DIR/results.md (means and paired
differences with 95% intervals), DIR/rouge_vs_round.png, DIR/rouge_vs_missing_rate.png,
DIR/repro.json, DIR/environment.jsonl, and one run directory per cell under DIR/cells/.
SIGTERM / Ctrl-C stop after the current round of the running cell (with a checkpoint);
--max_minutes stops starting new cells after that long. Rerun the same command to go on.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))   # the repository root

from absl import app, flags
from ml_collections import config_flags

from studies.compare import grid as compare, tuning
from ml_ecs.run.compilation_cache import enable_compilation_cache
from ml_ecs.run.trainer import train
from ml_ecs.config.validation import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Grid config (studies/compare/configs/compare.py).', lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
_MAX_MINUTES = flags.DEFINE_float('max_minutes', 0.0, 'Start no new cell after this many minutes (0 = no limit).',
                                  lower_bound=0.0)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from tqdm import tqdm
  cfg, workdir = _CONFIG.value, _WORKDIR.value
  log = lambda s: tqdm.write(s)
  deadline = time.time() + 60 * _MAX_MINUTES.value if _MAX_MINUTES.value else None
  try:
    compare.check_grid(cfg)
  except (ConfigError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  os.makedirs(workdir, exist_ok=True)
  # Cells share many identical programs (same shapes, same server/eval functions).
  enable_compilation_cache(os.path.join(workdir, 'cache', 'jax'))

  def run_cell(c, cdir, cache):
    if deadline is not None and time.time() > deadline:
      return False
    result = train(c, cdir, progress=False, cache_dir=cache, log=lambda s: log('    ' + s))
    return result.status != 'interrupted'

  try:
    if 'tune' in cfg and cfg.tune.trials > 0 and not cfg.grid.tuned:
      tuned = tuning.run_tuning(cfg, workdir, run_cell, log=log)
      if tuned is None:
        print('tuning stopped; rerun the same command to go on', flush=True)
        return 0
      cfg.grid.tuned = os.path.join(workdir, 'tuned.json')
    results = compare.run_grid(cfg, workdir, run_cell, log=log, progress=True, deadline=deadline)
    if len(results) < len(compare.cells(cfg.grid)):
      print(f'{len(results)} of {len(compare.cells(cfg.grid))} cells done; rerun the same command to go on')
      return 0
    if cfg.grid.get('reproduce', 0):
      compare.reproduce(cfg, workdir, run_cell, cfg.grid.reproduce, log=log)
      compare.write_reports(results, workdir, cfg.grid)
  except (ConfigError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'grid complete: {workdir}/results.csv, results.md and plots', flush=True)
  return 0


if __name__ == '__main__':
  app.run(main)
