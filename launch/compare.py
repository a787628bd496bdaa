"""Baselines and ablations on one grid; resumes a half-finished grid, inside a cell too.

  python launch/compare.py --config=configs/compare.py --workdir=/tmp/compare
Writes DIR/results.csv, DIR/results.md, DIR/rouge_vs_round.png, DIR/rouge_vs_missing_rate.png
and one run directory per cell under DIR/cells/. SIGTERM / Ctrl-C stop after the current
round of the running cell (with a checkpoint); rerun the same command to go on.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from ml_ecs.compare import run_grid
from ml_ecs.compilation_cache import enable_compilation_cache
from ml_ecs.trainer import train
from ml_ecs.validation import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Grid config (configs/compare.py).', lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  # Cells share many identical programs (same shapes, same server/eval functions).
  enable_compilation_cache(os.path.join(workdir, 'cache', 'jax'))

  from tqdm import tqdm
  log = lambda s: tqdm.write(s)

  def run_cell(cfg, cdir, cache):
    result = train(cfg, cdir, progress=False, cache_dir=cache, log=lambda s: log('    ' + s))
    return result.status != 'interrupted'

  try:
    run_grid(_CONFIG.value, workdir, run_cell, log=log, progress=True)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {workdir}/results.csv, results.md and plots', flush=True)
  return 0


if __name__ == '__main__':
  app.run(main)
