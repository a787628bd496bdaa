"""R federations as one program against R separate runs, in one benchmark run (ml_ecs.core.runs).

  python benchmarks/runs_program.py --runs=1,4,10,20 --separate=4 --rounds=5 \\
      --out=benchmarks/results/runs_program

The runs are comparison cells (`--config`, default studies/compare/configs/collaborate.py:pairs_reduced,
method `--method`): partition seeds 0, 1, ... and training seeds 0, 1 in grid order, each `--rounds` rounds,
evaluated at round 0 and at the end, no checkpoints. Every measured piece is a fresh subprocess with its own
empty JAX compilation cache; the pretrained backbones (one per training seed) are made once beforehand in a
shared cache, so pretraining (the same for both ways) is left out of both.

  * separate: the first `--separate` runs one after another in one process, as the comparison grid runs
    its cells (`trainer.train` per cell, the persistent compilation cache shared: the first cell compiles,
    the others reuse its programs but trace their own);
  * program R: the first R runs as one program (`runs_trainer.train_runs`).

R separate runs cost the measured sum where R <= --separate, else the first run plus R - 1 times the mean of
the others; the table says which. The projection is rough: a later cell with a new training seed reuses the
first's compiled programs, but one with a new partition seed has other data shapes and compiles its own
(measured on f4fb414: 32 s against 64 s), so measure R separate runs (--separate=R) where the ratio matters.
Peak RSS is the subprocess's. Writes runs_program.json and runs_program.md to --out.

`--devices=N` gives the programs N host CPU devices (`--xla_force_host_platform_device_count`) with their run
axis split over them (`runs.init(run_devices=N)`: each device, here a core, trains whole runs); the separate
runs keep one device, as the grid runs its cells by default (a single cell's round measured the same on 1 and
2 host devices, 0.67 s, and its clients would be padded to the device count). `--run_batch=B`: the programs
compute B runs at once (`runs.init(run_batch_size=B)`; 0, the default: the platform's, one at a time on a CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _configs(args, count: int):
  from studies.compare import grid
  from ml_ecs.config.cli import load_config
  base = load_config(os.path.join(ROOT, args.config))
  cells = [(args.method, base.grid.missing_rates[0], base.grid.num_clients[0], p, t)
           for p in range(10) for t in (0, 1)][:count]
  out = []
  for cell in cells:
    cfg = grid.cell_config(base, cell)
    cfg.train.update(dict(rounds=args.rounds, eval_every=args.rounds, checkpoint_every=0))
    out.append(cfg)
  return out


def _piece(args) -> dict:
  """One measured piece (in its own process): `args.mode` is 'warm', 'separate' or 'program'."""
  from ml_ecs.data.loaders import load_dataset
  from ml_ecs.run.compilation_cache import enable_compilation_cache
  from ml_ecs.run import metrics_io, trainer
  from ml_ecs.run.runs_trainer import train_runs
  cfgs = _configs(args, args.count)
  quiet = lambda s: None
  ds = load_dataset(cfgs[0].data)
  work = tempfile.mkdtemp(prefix=f'runs_{args.mode}_', dir=args.scratch)
  enable_compilation_cache(os.path.join(work, 'jax'))
  t0 = time.perf_counter()
  if args.mode == 'warm':   # the pretrained backbones, one per training seed
    from ml_ecs.core import build
    for cfg in {c.seed: c for c in cfgs}.values():
      build.init(cfg, dataset=ds, log=quiet, cache_dir=args.backbones)
    return {'wall_s': time.perf_counter() - t0}
  dirs = [os.path.join(work, f'run_{r}') for r in range(len(cfgs))]
  per_run = []
  if args.mode == 'separate':
    for cfg, d in zip(cfgs, dirs):
      t = time.perf_counter()
      trainer.train(cfg, d, progress=False, checkpoint=False, cache_dir=args.backbones, dataset=ds, log=quiet)
      per_run.append(time.perf_counter() - t)
  else:
    train_runs(cfgs, dirs, os.path.join(work, 'program'), checkpoint=False, cache_dir=args.backbones, dataset=ds,
               log=quiet, run_devices=args.devices, run_batch_size=args.run_batch or None)
  wall = time.perf_counter() - t0
  timing = metrics_io.read_jsonl(os.path.join(dirs[0], 'timing.jsonl'))
  rounds = [t for t in timing if t['round'] >= 1]
  # An evaluation's time: a separate run's own; a program's is the sum over its runs (each run's row holds
  # its scoring and its share of the decoding, which runs once for all: runs.evaluate).
  members = dirs if args.mode == 'program' else dirs[:1]
  evals = [[t.get('time/eval_s', 0.0) for t in metrics_io.read_jsonl(os.path.join(d, 'timing.jsonl'))]
           for d in members]
  return {'wall_s': wall, 'per_run_s': per_run, 'setup_s': timing[0]['time/setup_s'],
          'eval0_s': sum(e[0] for e in evals), 'round1_s': rounds[0]['time/round_s'],
          'steady_round_s': [t['time/round_s'] for t in rounds[1:]],
          'last_eval_s': sum(e[-1] for e in evals),
          'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run_piece(args, mode: str, count: int) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), '--piece', f'--mode={mode}', f'--count={count}',
         f'--config={args.config}', f'--method={args.method}', f'--rounds={args.rounds}',
         f'--backbones={args.backbones}', f'--scratch={args.scratch}', f'--devices={args.devices}',
         f'--run_batch={args.run_batch}']
  devices = args.devices if mode == 'program' else 1
  xla = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform')]
  env = dict(os.environ, XLA_FLAGS=' '.join(xla + [f'--xla_force_host_platform_device_count={devices}']))
  t = time.perf_counter()
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
  if res.returncode:
    raise SystemExit(f'{mode} x{count} failed:\n{res.stderr[-3000:]}')
  out = json.loads(res.stdout.strip().splitlines()[-1])
  out['process_s'] = time.perf_counter() - t
  print(f'{mode} x{count}: {out["process_s"]:.1f} s', flush=True)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='studies/compare/configs/collaborate.py:pairs_reduced')
  p.add_argument('--method', default='ml_ecs')
  p.add_argument('--runs', default='1,4,10,20', help='program sizes R (comma-separated, each 1..20)')
  p.add_argument('--separate', type=int, default=4, help='separate runs measured (>= 2)')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--cell_rounds', type=int, default=50, help='the projected cell: rounds ...')
  p.add_argument('--cell_eval_every', type=int, default=5, help='... and evaluated every this many')
  p.add_argument('--devices', type=int, default=1, help='host CPU devices of the programs, their run axis split '
                 'over them (the separate runs keep 1)')
  p.add_argument('--run_batch', type=int, default=0, help='runs a program computes at once (0: the platform\'s '
                 'default, ml_ecs.core.runs.run_batch)')
  p.add_argument('--out', default='', help='directory for runs_program.json / .md (default: a new temp dir)')
  p.add_argument('--piece', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--mode', default='', help=argparse.SUPPRESS)
  p.add_argument('--count', type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument('--backbones', default='', help=argparse.SUPPRESS)
  p.add_argument('--scratch', default='', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.piece:
    print(json.dumps(_piece(args)))
    return
  sizes = [int(x) for x in args.runs.split(',')]
  if not sizes or any(not 1 <= r <= 20 for r in sizes) or args.separate < 2 or args.rounds < 1 or args.devices < 1 \
     or args.run_batch < 0:
    p.error('--runs: integers in 1..20; --separate >= 2; --rounds >= 1; --devices >= 1; --run_batch >= 0')
  out = args.out or tempfile.mkdtemp(prefix='runs_program_')
  os.makedirs(out, exist_ok=True)
  args.scratch = tempfile.mkdtemp(prefix='runs_program_work_')
  args.backbones = os.path.join(args.scratch, 'backbones')
  from ml_ecs.run import environment, metrics_io
  env = environment.environment()
  report = {'command': ' '.join(sys.argv), 'config': args.config, 'method': args.method, 'rounds': args.rounds,
            'program_devices': args.devices, 'run_batch': args.run_batch, 'environment': env, 'complete': False}
  path = os.path.join(out, 'runs_program.json')
  # Written after every piece (complete: False until the rows are in), so a run cut short by its time limit still
  # leaves what it measured (benchmarks/protocol_cost.py projects from any separate piece and program sizes).
  report['warm_backbones_s'] = _run_piece(args, 'warm', max(sizes + [args.separate]))['wall_s']
  report['separate'] = separate = _run_piece(args, 'separate', args.separate)
  report['programs'] = programs = {}
  metrics_io.write_json(path, report)
  for r in sizes:
    programs[r] = _run_piece(args, 'program', r)
    metrics_io.write_json(path, report)
  each = separate['per_run_s']
  later = sum(each[1:]) / len(each[1:])
  sep_cost = lambda r: (sum(each[:r]), 'measured') if r <= len(each) else (each[0] + (r - 1) * later, 'projected')
  # A grid cell's length (--cell_rounds rounds, evaluated every --cell_eval_every): each way's measured wall time
  # (set-up, compilation, the measured rounds, the evaluations at round 0 and at the end, and whatever else the
  # job does) plus the rounds and evaluations still missing at their measured cost (later rounds: the mean;
  # an evaluation: the last one's, a program's summed over its runs).
  n_rounds, n_evals = args.cell_rounds, args.cell_rounds // args.cell_eval_every + 1
  mean = lambda xs: sum(xs) / max(len(xs), 1)
  more_rounds, more_evals = max(n_rounds - args.rounds, 0), max(n_evals - 2, 0)
  sep_steady = mean(separate['steady_round_s'])
  sep_more = more_rounds * sep_steady + more_evals * separate['last_eval_s']   # per cell
  rows = []
  for r, pr in programs.items():
    cost, how = sep_cost(r)
    steady = mean(pr['steady_round_s'])
    rows.append({'runs': r, 'program_s': pr['wall_s'], 'separate_s': cost, 'separate_is': how,
                 'speedup': cost / pr['wall_s'], 'setup_s': pr['setup_s'], 'round1_s': pr['round1_s'],
                 'steady_round_s': steady, 'steady_round_per_run_s': steady / r,
                 'evals_s': pr['eval0_s'] + pr['last_eval_s'], 'peak_rss_mb': pr['peak_rss_mb'],
                 'cell_program_s': pr['wall_s'] + more_rounds * steady + more_evals * pr['last_eval_s'],
                 'cell_separate_s': cost + r * sep_more})
    rows[-1]['cell_speedup'] = rows[-1]['cell_separate_s'] / rows[-1]['cell_program_s']
  report.update(rows=rows, complete=True)
  metrics_io.write_json(path, report)
  lines = [f'# R runs as one program vs R separate runs ({args.method}, {args.config}, {args.rounds} rounds)', '',
           'Measured: each way for the runs below at --rounds rounds, evaluated at round 0 and at the end. Projected: '
           f'the same runs at a grid cell\'s length ({n_rounds} rounds, {n_evals} evaluations): the measured wall time '
           'plus the missing rounds and evaluations at their measured cost (a program\'s evaluation: the sum over its '
           'runs).', '',
           f'`{report["command"]}`', '',
           f'Machine: {env.get("cpu", platform.processor())}, {os.cpu_count()} cores; jax {env["packages"].get("jax")}; commit {env.get("git_commit")}. '
           f'Programs on {args.devices} host device(s), their run axis split over them, '
           f'{args.run_batch or "the default number of"} run(s) computed at once; separate runs on 1. '
           f'Separate runs measured: {len(each)} ({", ".join(f"{x:.0f}" for x in each)} s; the first compiles, a later '
           f'one with a new partition seed compiles for its data shapes, one with a new training seed reuses the '
           f'programs); a separate run\'s setup {separate["setup_s"]:.1f} s, first round '
           f'{separate["round1_s"]:.1f} s, later rounds {sep_steady:.2f} s.', '',
           '| R | program s | R separate s | speedup | setup s | round 1 s | later round s (per run) | '
           f'evaluations s | peak RSS MB | projected {n_rounds}-round cells: program s / separate s (speedup) |',
           '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|']
  for x in rows:
    lines.append(f"| {x['runs']} | {x['program_s']:.0f} | {x['separate_s']:.0f} ({x['separate_is']}) | "
                 f"{x['speedup']:.2f}x | {x['setup_s']:.0f} | {x['round1_s']:.1f} | {x['steady_round_s']:.2f} "
                 f"({x['steady_round_per_run_s']:.2f}) | {x['evals_s']:.1f} | {x['peak_rss_mb']:.0f} | "
                 f"{x['cell_program_s']:.0f} / {x['cell_separate_s']:.0f} ({x['cell_speedup']:.2f}x) |")
  with open(os.path.join(out, 'runs_program.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
