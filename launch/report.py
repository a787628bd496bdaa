"""Draws the report of a workdir as PNGs (a run from launch/train.py or a grid from studies/compare/run.py).

  python launch/report.py --workdir=/tmp/ml_ecs        # -> /tmp/ml_ecs/report/*.png
  python launch/report.py --workdir=/tmp/compare       # -> /tmp/compare/report/*.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from ml_ecs.run.report import NotAWorkdirError, report

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run or grid workdir.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the PNGs (default: WORKDIR/report).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  try:
    paths = report(_WORKDIR.value, _OUT.value)
  except NotAWorkdirError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for p in paths:
    print(f'wrote {p}')
  return 0


if __name__ == '__main__':
  app.run(main)
