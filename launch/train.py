"""Main job: ML-ECS federated training on the configured data.

  python launch/train.py --config=configs/default.py --workdir=/tmp/ml_ecs
  python launch/train.py --config=configs/default.py --workdir=/tmp/run --config.data.num_clients=20
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

from ml_ecs.trainer import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (metrics, summary, checkpoints).')
_PROGRESS = flags.DEFINE_boolean('progress', True, 'Show a progress bar.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  train(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
  print(f'wrote {os.path.join(_WORKDIR.value, "metrics.jsonl")} and summary.json')


if __name__ == '__main__':
  app.run(main)
