"""Main job: ML-ECS federated training on the configured data; resumes a run in its workdir.

  python launch/train.py --config=configs/default.py --workdir=/tmp/ml_ecs
  python launch/train.py --config=configs/default.py --workdir=/tmp/run --config.data.num_clients=20

Rerunning a command continues from the newest checkpoint in --workdir; a finished run is
left as it is unless --overwrite. SIGTERM / Ctrl-C stop after the current round with a
checkpoint (exit status 143 / 130); rerun the same command to resume.
"""
import os
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from ml_ecs.trainer import WorkdirConflict, train
from ml_ecs.validation import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (metrics, summary, checkpoints).')
_PROGRESS = flags.DEFINE_boolean('progress', True, 'Show a progress bar.')
_OVERWRITE = flags.DEFINE_boolean('overwrite', False, 'Delete the run in --workdir and start afresh.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  try:
    result = train(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value, overwrite=_OVERWRITE.value)
  except (ConfigError, WorkdirConflict) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if result.status == 'interrupted':
    return 128 + int(getattr(signal, result.signal_name))
  if result.status == 'complete':
    print(f'wrote {os.path.join(_WORKDIR.value, "metrics.jsonl")} and summary.json')
  return 0


if __name__ == '__main__':
  app.run(main)
