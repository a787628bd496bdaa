"""Main job: ML-ECS federated training on the configured data; resumes a run in its workdir.

  python launch/train.py --config=configs/default.py --workdir=/tmp/ml_ecs
  ml-ecs-train --config=default --workdir=/tmp/ml_ecs      # after pip install, from any directory
  python launch/train.py --config=configs/default.py --workdir=/tmp/run --config.data.num_clients=20

Rerunning a command continues from the newest checkpoint in --workdir; a finished run is
left as it is unless --overwrite. SIGTERM / Ctrl-C stop after the current round with a
checkpoint (exit status 143 / 130); rerun the same command to resume.

`method.name` selects a strategy of ml_ecs/algorithms/registry.py (fedavg, fedprox, local, ...), which sets
the method fields it controls; `--config.method.FIELD=...` given on the command line wins over it
(e.g. --config.method.name=fedprox --config.method.fedprox_mu=0.1). Exit status 2: a config, data
or workdir error, an unknown config field (with did-you-mean) or a workdir held by another process
(one `error:` line naming it); 3: the whole federation diverged (its state is never checkpointed).

Many processes (one per host, or several CPU processes here): every process runs the same
command; on SLURM (srun), Open MPI (mpirun) and TPU pod slices they find each other from the
environment, elsewhere give --coordinator_address, --num_processes and --process_id
(launch/local_multiprocess.py does that for N local CPU processes). See docs/many_hosts.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root

from ml_ecs.run.train_cli import main, resolved_config, run  # noqa: E402,F401  (flags, main: ml_ecs/run/train_cli.py)

if __name__ == '__main__':
  run()
