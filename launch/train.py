"""Main job: ML-ECS federated training on the configured data; resumes a run in its workdir.

  python launch/train.py --config=configs/default.py --workdir=/tmp/ml_ecs

A thin wrapper of the installed command `ml-ecs-train` (ml_ecs/run/train_cli.py, which documents the
flags, resume, exit statuses and many processes).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root

from ml_ecs.run.train_cli import main, resolved_config, run  # noqa: E402,F401  (flags, main: ml_ecs/run/train_cli.py)

if __name__ == '__main__':
  run()
