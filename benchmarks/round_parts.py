"""A program of R comparison cells' later rounds, part by part (cohorts, aggregation, server stage), in this
process: the quick way to see what a change to the models or the round does to a round's time.

  python benchmarks/round_parts.py --runs=1 --rounds=6
  python benchmarks/round_parts.py --runs=10 --rounds=6 --root=/tmp/old_checkout   # another checkout's code
  python benchmarks/round_parts.py --runs=1 --rounds=3 --profile=8                   # and where the time goes
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/round_parts.py --runs=10 --run_devices=2
  python benchmarks/round_parts.py --runs=10 --run_batch=10                          # all 10 runs vmapped at once

The runs are benchmarks/runs_program.py's (`--config`, `--method`: partition seeds 0, 1, ... x training seeds
0, 1 in grid order) as one program (`ml_ecs.core.runs`; R = 1 is one run on the same path). `--root` imports
ml_ecs from another checkout (e.g. `git worktree add /tmp/old REV`), so two revisions can be measured in turn,
interleaved, on one machine. The compilation cache and pretrained backbones are kept under `--cache`
(shared by both checkouts: a backbone depends only on its config). Prints one JSON line per round and the
medians of the later rounds (round 1 compiles). `--profile=N` then records one more round's calls and, per compiled
program (each cohort's round and the server stage), prints XLA's flop count, the seconds of a call (best of 3)
and the achieved GFLOP/s, and the N costliest operators (benchmarks/lib/op_profile.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='studies/compare/configs/collaborate.py:pairs_reduced')
  p.add_argument('--method', default='ml_ecs')
  p.add_argument('--runs', type=int, default=1)
  p.add_argument('--rounds', type=int, default=6)
  p.add_argument('--root', default=HERE, help='the checkout whose ml_ecs is measured (default: this one)')
  p.add_argument('--cache', default=os.path.join('/tmp', 'round_parts_cache'))
  p.add_argument('--run_devices', type=int, default=1, help='split the run axis over this many devices (several '
                 'host devices: XLA_FLAGS=--xla_force_host_platform_device_count=N)')
  p.add_argument('--run_batch', type=int, default=0, help='runs computed at once (0: the platform\'s default, '
                 'ml_ecs.core.runs.run_batch)')
  p.add_argument('--profile', type=int, default=0, help='after the rounds: flops, GFLOP/s and the N costliest '
                 'operators of each round program (0: off)')
  args = p.parse_args()
  if args.runs < 1 or args.rounds < 2:
    p.error('--runs >= 1, --rounds >= 2')
  sys.path.insert(0, os.path.abspath(args.root))
  import ml_ecs
  from benchmarks.runs_program import _configs
  import jax
  from ml_ecs.core import runs
  from ml_ecs.data.loaders import load_dataset
  from ml_ecs.run.compilation_cache import enable_compilation_cache
  from ml_ecs.run.environment import environment
  enable_compilation_cache(os.path.join(args.cache, 'jax'))
  cfgs = _configs(argparse.Namespace(config=args.config, method=args.method, rounds=args.rounds), args.runs)
  ds = load_dataset(cfgs[0].data)
  t0 = time.perf_counter()
  # run_devices, run_batch only when asked: a --root checkout from before them has no such arguments
  split = {'run_devices': args.run_devices} if args.run_devices > 1 else {}
  if args.run_batch:
    split['run_batch_size'] = args.run_batch
  program, state = runs.init(cfgs, dataset=ds, cache_dir=os.path.join(args.cache, 'backbones'), log=lambda s: None,
                             **split)
  env = environment()
  print(json.dumps({'ml_ecs': os.path.dirname(ml_ecs.__file__), 'commit': env.get('git_commit'), 'cpu': env.get('cpu'),
                    'runs': args.runs, 'devices': jax.device_count(), 'mesh': dict(program.setups[0].mesh.shape),
                    'run_batch': getattr(program, 'batch', args.runs),
                    'setup_s': round(time.perf_counter() - t0, 3)}), flush=True)
  parts = ('time/round_s', 'time/cohorts_s', 'time/aggregate_s', 'time/server_s')
  rows = []
  for _ in range(args.rounds):
    state, metrics = runs.run_round(program, state)
    rows.append({k: round(metrics[0][k], 3) for k in parts})
    print(json.dumps({'round': len(rows), **rows[-1]}), flush=True)
  print(json.dumps({'later_rounds_median': {k: statistics.median(r[k] for r in rows[1:]) for k in parts},
                    'per_run_round_s': statistics.median(r['time/round_s'] for r in rows[1:]) / args.runs}))
  if args.profile:
    _profile(runs, program, state, args.profile)


def _profile(runs, program, state, top: int) -> None:
  """One more round with its programs' calls recorded, then each program's flops, time and costliest operators."""
  import dataclasses
  import jax
  import jax.numpy as jnp
  from benchmarks.lib import op_profile
  fresh = lambda args: jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, args)  # noqa: E731
  calls = {}

  def recorded(name, fn):
    def call(*args):
      calls[name] = (fn, fresh(args))   # copies: a round program consumes (donates) its state arguments
      return fn(*args)
    return call
  spy = dataclasses.replace(program, round_fns=tuple(recorded(f'cohort {k}', f) for k, f in enumerate(program.round_fns)),
                            server_round_fn=recorded('server stage', program.server_round_fn))
  runs.run_round(spy, state)
  for name, (fn, args) in calls.items():
    compiled = fn.lower(*args).compile()
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost).get('flops', 0.0)
    seconds = []
    for _ in range(3):
      a = fresh(args)
      jax.block_until_ready(a)
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*a))
      seconds.append(time.perf_counter() - t0)
    print(json.dumps({'program': name, 'gflop': round(flops / 1e9, 3), 'call_s': round(min(seconds), 4),
                      'gflop_per_s': round(flops / 1e9 / min(seconds), 2)}), flush=True)
    lines = op_profile.hlo_lines(compiled)
    inputs = iter([fresh(args) for _ in range(3)])
    ops, other = op_profile.op_times(lambda: fn(*next(inputs)), 3, lines)
    print(f'operators of {name} (executor {other["executor"]:.3f} thread-s per call):')
    print('\n'.join(op_profile.table(ops, lines, top=top)), flush=True)


if __name__ == '__main__':
  main()
