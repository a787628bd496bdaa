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
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from ml_ecs.core import distributed
from ml_ecs.core.faults import FederationDiverged
from ml_ecs.algorithms.registry import apply_strategy
from ml_ecs.run.trainer import WorkdirConflict, WorkdirLocked, train
from ml_ecs.config.cli import parse_flags
from ml_ecs.config.validation import ConfigError, DataError
from ml_ecs.run.compilation_cache import (default_backbone_cache, default_cache_dir, enable_compilation_cache,
                                          writable_folder)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (metrics, summary, checkpoints).')
_PROGRESS = flags.DEFINE_boolean('progress', True, 'Show a progress bar.')
_OVERWRITE = flags.DEFINE_boolean('overwrite', False, 'Delete the run in --workdir and start afresh.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0 when the run is one of several processes.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes of the run (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', distributed.MODES,
                                 "Join other processes: 'auto' when SLURM, Open MPI or a TPU pod's environment "
                                 "announces several; 'on' always (JAX's cluster detection, e.g. Cloud TPU VMs); "
                                 "'off' never. Explicit --coordinator_address etc. win.")
_CACHE = flags.DEFINE_string('compilation_cache', None,
                             'Folder of compiled XLA programs reused by later runs (a second run skips most of '
                             "its first-round compilation); default $JAX_COMPILATION_CACHE_DIR or "
                             "~/.cache/ml_ecs/jax; '' turns it off. Results are the same either way.")
_BACKBONE_CACHE = flags.DEFINE_string('backbone_cache', None,
                                      'Folder whose backbones/ keeps pretrained backbones for later runs (keyed by '
                                      'the backbone, text and pretraining config, the data, jax version, platform '
                                      'and XLA flags: a new workdir skips pretraining); default '
                                      "$ML_ECS_BACKBONE_CACHE or ~/.cache/ml_ecs; '' turns it off. The run's own "
                                      'copy stays in its workdir, so a resume uses the same backbone anywhere.')
flags.mark_flags_as_required(['config', 'workdir'])


def resolved_config():
  """The config with strategy method.name applied; method fields set on the command line win."""
  cfg = _CONFIG.value
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  keep = [k.split('.', 1)[1] for k in overrides if k.startswith('method.') and k != 'method.name']
  try:
    return apply_strategy(cfg, cfg.method.name, keep=keep)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def main(argv):
  del argv
  cache = default_cache_dir() if _CACHE.value is None else _CACHE.value
  if cache:
    try:
      enable_compilation_cache(cache)
    except OSError as e:   # an unwritable cache folder costs only time: say so and run without
      print(f'warning: no compilation cache ({e}); pass --compilation_cache=DIR or --compilation_cache=',
            file=sys.stderr)
  backbones = default_backbone_cache() if _BACKBONE_CACHE.value is None else _BACKBONE_CACHE.value
  if backbones and writable_folder(backbones) is None:   # costs only time, like the compilation cache
    print(f'warning: {backbones} is not writable: no shared backbone cache (pass --backbone_cache=DIR or '
          "--backbone_cache='')", file=sys.stderr)
    backbones = ''
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
    cfg = resolved_config()
    result = train(cfg, _WORKDIR.value, progress=_PROGRESS.value, overwrite=_OVERWRITE.value,
                   backbone_cache=backbones or None)
  except (ConfigError, DataError, WorkdirConflict, WorkdirLocked) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except PermissionError as e:   # e.g. a read-only workdir or file in it
    print(f'error: {e.strerror}: {e.filename} (is --workdir writable?)', file=sys.stderr)
    return 2
  except FederationDiverged as e:
    print(f'error: {e}', file=sys.stderr)
    return 3
  if result.status == 'interrupted':
    return 128 + int(getattr(signal, result.signal_name))
  if result.status == 'complete' and distributed.is_main():
    print(f'wrote {os.path.join(_WORKDIR.value, "metrics.jsonl")} and summary.json')
  return 0


def run():
  """`ml-ecs-train` (setup.py's console entry point) and `python launch/train.py`: the main job.
  `--config=NAME` also finds the packaged configs (configs/NAME.py) from any directory."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
