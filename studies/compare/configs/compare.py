"""The comparison protocol (studies/compare/run.py): equal tuning, then the grid, then a reproduction check.

  python studies/compare/run.py --config=studies/compare/configs/compare.py --workdir=/tmp/compare --max_minutes=100

Run the same command again (and again) until it prints that the grid is complete: every
stage resumes (tuning trials, grid cells, inside a cell from its checkpoint).
Stages: (1) tuning: `tune.trials` random-search trials per method in `tune.methods` on a
validation split cut from the clients' training data, each trial run on every tuning seed
(`tune.seeds`, apart from the grid's) for as many rounds as a grid cell, with common random
numbers (trial i has the same learning rate for every method); ablations reuse ML-ECS's
values; (2) the grid: methods x missing rates x clients x partition seeds x training seeds,
each cell scored by the mean of its last `grid.last_k` evaluations; (3) `grid.reproduce`
finished cells rerun from scratch and compared. The report's intervals are clustered on the
partition seed, and the confirmatory contrasts (`grid.contrasts`, Holm-corrected) and the
reference baseline (`grid.reference`) are fixed here, before any test data is seen.
The missing rate is the per-device-type modality-missing rate; the modality sets of each
rate are drawn with `grid.modality_seed`, the same for every partition seed.
Base: studies/compare/configs/discriminating.py:clients_scarce. The secondary grid is studies/compare/configs/compare_secondary.py.

Variants:
  full (default)  the whole protocol: 9 methods x missing rates 0.3/0.5/0.7, 10 partition x 2 training
                  seeds, 50 rounds, 8 tuning trials x 2 seeds per tuned method. Measured on 2 CPU
                  cores: ~3 s a round, ~6 min a cell, 540 cells + 80 trial runs ~ 60 CPU-hours (an
                  accelerator's job).
  reduced         what fits one 2-core session (studies/compare/results/): settings cut, never the seeds,
                  the equal tuning or the intervals. Cut: fedprox, mmfl and the four ablations;
                  missing rates 0.3 and 0.7 (0.5 kept); half the local/server steps per round; 4
                  tuning trials per method (equal for local, fedavg and ML-ECS).
The published studies/compare/results/ predate the tuning and statistics above (5 partition
seeds, one tuning seed, 25-round trials, bootstrap intervals over runs); docs/results.md says so.
"""
import ml_collections

from studies.compare.configs import discriminating
from ml_ecs.algorithms.registry import STRATEGIES


VARIANTS = ('full', 'reduced')


def get_config(variant: str = 'full') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'studies/compare/configs/compare.py: variant {variant!r}, expected one of {VARIANTS}')
  c = discriminating.get_config('clients_scarce')   # the benchmark where collaboration carries information
  c.train.update(dict(rounds=50, eval_every=5, checkpoint_every=10))
  c.data.client_val_fraction = 0.2   # the same partition for tuning and grid; val never used by the grid
  c.data.test_order = 'interleaved'   # the scored test windows spread over every test recording
  c.grid = ml_collections.ConfigDict(dict(
      methods=tuple(STRATEGIES),
      missing_rates=(0.3, 0.5, 0.7),
      num_clients=(5,),
      partition_seeds=tuple(range(10)),
      train_seeds=(0, 1),
      modality_seed=0,
      last_k=3,
      tuned='',                     # set by studies/compare/run.py after tuning (WORKDIR/tuned.json)
      reproduce=3,
      # Fixed before any test data is seen: the confirmatory contrasts (method-baseline, Holm-corrected
      # together, on the clients and the server) and the reference of the exploratory differences.
      contrasts=('ml_ecs-local', 'ml_ecs-fedavg'),
      reference='fedavg',
      # Unfinished cells (and tuning trials) that differ only in seeds and continuous hyperparameters run this many at a
      # time as one program (ml_ecs.core.runs: one setup of the compiled functions for all the runs; 2.04x the
      # cells run one by one at 10 over 6-round cells, 1.4-1.6x projected for 50-round cells on 2 CPU cores,
      # docs/scale.md); 1 = one cell at a time.
      runs_per_program=10,
      # A program's run axis split over this many devices (each device trains whole runs; ml_ecs.core.runs.init),
      # fewer where a program's runs do not divide; 1 = every run on every device, its clients split over them.
      # On one CPU host, give XLA a device per core first: XLA_FLAGS=--xla_force_host_platform_device_count=2.
      run_devices=1,
      # Runs one compiled call computes at once (ml_ecs.core.runs.run_batch); 0 = the platform's default: one after
      # another on a CPU (a later round of 10 cells 1.2x faster than vmapped, docs/scale.md), all at once (vmapped)
      # on an accelerator.
      run_batch=0,
  ))
  c.tune = ml_collections.ConfigDict(dict(
      methods=('local', 'fedavg', 'fedprox', 'mmfl', 'ml_ecs'),
      trials=8,
      rounds=0,                     # trial length; 0 = train.rounds (the same for every method)
      seed=0,
      seeds=(100, 101),             # each a partition and a training seed; a trial's score is their mean
      missing_rate=0.5,
      # 'stratified': each knob's trials spread over its whole range (studies/compare/tuning.py: _draw)
      draw='stratified',
  ))
  if variant == 'reduced':
    c.train.update(dict(public_steps=2, private_steps=6, server_steps=6))
    c.grid.update(dict(methods=('local', 'fedavg', 'ml_ecs'), missing_rates=(0.5,)))
    # trials as long as the grid; 'random' draws: the ones studies/compare/results/compare_reduced_fixed ran
    # (its command resumes from them); their four learning rates were all at or below 2.8e-3 of a range to 1e-2
    c.tune.update(dict(methods=('local', 'fedavg', 'ml_ecs'), trials=4, draw='random'))
  return c
