"""ours / pfl on CPU, in one run: pfl-research's CIFAR-10 workload on our engine (jax CPU, this process) and on
pfl 0.6.0 itself (PyTorch CPU, a subprocess in a venv that has torch + pfl; our venv has neither), on identical
arrays, in interleaved pieces (ours, pfl, ours, pfl, ...) so that drift in the load of a shared machine falls on
both.

  python benchmarks/pfl_cpu.py --pfl_python=/work/pflvenv/bin/python --pieces=2 --rounds=10 \\
      --out=benchmarks/results/pfl_cpu [--small] [--threads=2] [--cpu_devices=0]

Data: `benchmarks.lib.pfl_cifar10.synthetic_cifar10` (CIFAR-10's shapes; no CIFAR-10 copy can be read here), partitioned
once with `partition_iid` and written to an .npz that the pfl subprocess reads (`--data`); our side partitions
the same arrays with the same function and seed. Each piece is an independent run of `--rounds` rounds from the
initial model (ours: compile excluded and reported apart; pfl: a fresh process). Timing per engine:
  * wall s/round (the headline): all rounds of a piece, summed over pieces (ours after compile; pfl from
    `on_train_begin`, its first round included). With `--rounds` a multiple of `eval_every` both sides evaluate
    the same number of times per piece (ours after rounds 10, 20, ...; pfl's CentralEvaluationCallback after
    rounds 1, 11, ...), evaluation included as pfl's benchmark counts it;
  * steady s/round: from the end of round `--warmup` to the end of the last round (ours waits for every round,
    `sync_rounds`; pfl's per-round callback). It leaves pfl's round-1 evaluation out, so it flatters pfl by
    one evaluation per piece; given for the warm-up it removes, not as the headline.
Writes pfl_cpu.json (everything, per piece) and pfl_cpu.md (the table) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks.lib import op_profile  # noqa: E402  (no JAX import at module level)

SMALL = dict(num_users=20, per_user=10, cohort=5, num_test=200, image=(8, 8, 3), eval_every=2)


def uptime() -> str:
  try:
    return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
  except OSError:
    return f'loadavg {os.getloadavg()}'


def cpu_name() -> str:
  try:
    for line in open('/proc/cpuinfo'):
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def steady(res: dict, warmup: int) -> tuple[float, int]:
  """(seconds, rounds) from the end of round `warmup` to the end of the last round."""
  ends = res.get('round_end_s') or []
  if len(ends) <= warmup:
    return 0.0, 0
  return ends[-1] - (ends[warmup - 1] if warmup else 0.0), len(ends) - warmup


def summarise(pieces: list[dict], warmup: int) -> dict:
  out = {}
  for eng in ('ours', 'pfl'):
    runs = [p[eng] for p in pieces if eng in p and p[eng].get('rounds')]
    if not runs:
      continue
    st = [steady(r, warmup) for r in runs]
    s_steady = sum(s for s, _ in st) / max(sum(n for _, n in st), 1)
    wall = sum(r['wall_s'] for r in runs) / sum(r['rounds'] for r in runs)
    out[eng] = dict(engine=runs[0]['engine'], pieces=len(runs), rounds=sum(r['rounds'] for r in runs),
                    steady_s_per_round=s_steady, steady_s_per_100_rounds=100 * s_steady,
                    steady_per_piece=[s / n if n else None for s, n in st], wall_s_per_round=wall,
                    final_accuracy_per_piece=[r.get('final_accuracy') for r in runs],
                    compile_s=[r['compile_s'] for r in runs] if eng == 'ours' else None)
  if 'ours' in out and 'pfl' in out:
    out['ours_over_pfl_speed'] = out['pfl']['wall_s_per_round'] / out['ours']['wall_s_per_round']
    out['ours_over_pfl_speed_steady'] = out['pfl']['steady_s_per_round'] / out['ours']['steady_s_per_round']
  return out


def markdown(rec: dict) -> str:
  s, cfg = rec['summary'], rec['cfg']
  L = ['# ours / pfl on CPU (pfl-research CIFAR-10 workload, synthetic CIFAR-shaped data)', '',
       f"command: `{rec['command']}`", '',
       f"machine: {rec['cpu']} x {rec['nproc']} (nproc), Python {rec['python']}; jax {rec['versions'].get('jax')}, "
       f"{rec['versions'].get('pfl_engine', 'pfl ?')}, torch threads {rec['threads']}; ours' clients over "
       f"{rec.get('cpu_devices', 1)} host device(s) (XLA_FLAGS `{rec.get('xla_flags', '')}`)", '',
       f"workload: {cfg['num_users']} users x {cfg['per_user']}, cohort {cfg['cohort']}, {cfg['epochs']} epoch of "
       f"batch {cfg['batch']}, image {tuple(cfg['image'])}, eval on {cfg['num_test']} every {cfg['eval_every']} "
       f"rounds; {rec['pieces']} interleaved pieces of {rec['rounds']} rounds per engine; steady state from the end "
       f"of round {rec['warmup']}", '',
       f"load: start `{rec['uptime_start']}`; end `{rec['uptime_end']}`", '',
       '| engine | rounds | wall s/round | wall s/100 rounds | steady s/round (per piece) | accuracy per piece |',
       '|---|---:|---:|---:|---|---|']
  for eng in ('ours', 'pfl'):
    if eng not in s:
      L.append(f'| {eng} | not run | | | | | |')
      continue
    e = s[eng]
    L.append(f"| {e['engine']} | {e['rounds']} | {e['wall_s_per_round']:.3f} | {100 * e['wall_s_per_round']:.1f} | "
             f"{e['steady_s_per_round']:.3f} (" + ' / '.join(f'{x:.3f}' if x else '-' for x in e['steady_per_piece'])
             + f") | {[round(a, 4) if a is not None else None for a in e['final_accuracy_per_piece']]} |")
  if 'ours_over_pfl_speed' in s:
    L += ['', f"ours / pfl (pfl s/round over ours, > 1 = ours faster): wall {s['ours_over_pfl_speed']:.2f}x "
              f"(steady, pfl's round-1 evaluation left out: {s['ours_over_pfl_speed_steady']:.2f}x)"]
  if 'compile_s' in s.get('ours', {}):
    L += ['', f"ours' compile (excluded above), per piece: {[round(c, 1) for c in s['ours']['compile_s']]} s"]
  for i, piece in enumerate(rec['runs']):
    ex = piece.get('ours', {}).get('execution')
    if ex:
      times = lambda r: ', '.join(f'{k} {v:.3f} s' for k, v in sorted(r['seconds'].items(), key=lambda kv: kv[1])) + \
          (', cached' if r['cached'] else '')
      L += ['', f"piece {i + 1}: ours' local steps as {ex['conv_impl']} convolutions, chunk {ex['chunk']} (autotune, one "
                f"local step of {ex['train_autotune']['case'].split('clients=')[-1]} clients: {times(ex['train_autotune'])}); "
                f"evaluation as {ex['eval_conv_impl']} in batches of {ex.get('eval_batch', 500)} (autotune, "
                f"{ex['eval_autotune']['case'].split('images=')[-1]} test images: {times(ex['eval_autotune'])})"]
  for i, piece in enumerate(rec['runs']):
    prof = piece.get('ours', {}).get('op_profile')
    if prof:
      L += ['', f"ours per HLO operator, piece {i + 1}: {prof['rounds']} rounds after the timed ones under the profiler "
                f"({prof['wall']:.2f} s/round with it; operator thread seconds {prof['executor']:.2f} per round, the "
                f"executor's own events (thread-pool regions and waits, overlapping) {prof['other']:.2f}; "
                f"`benchmarks/lib/op_profile.py`):", '']
      L += op_profile.table({k: tuple(v) for k, v in prof['ops'].items()}, prof['hlo'], unit='round')
  return '\n'.join(L) + '\n'


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--pfl_python', required=True, help='python of a venv with torch + pfl 0.6.0')
  ap.add_argument('--pieces', type=int, default=2)
  ap.add_argument('--rounds', type=int, default=10, help='rounds per piece and engine')
  ap.add_argument('--warmup', type=int, default=1, help='rounds of each piece left out of the steady rate')
  ap.add_argument('--threads', type=int, default=2, help='torch threads (jax CPU uses every core: 2 here)')
  ap.add_argument('--small', action='store_true', help='toy sizes (20 users x 10, cohort 5, 8x8 images)')
  ap.add_argument('--conv', default='auto', choices=('auto', 'xla', 'matmul'),
                  help="ours' convolutions (ml_ecs/models/conv.py): measured per run ('auto') or fixed")
  ap.add_argument('--cpu_devices', type=int, default=0,
                  help="ours' clients split over this many host CPU devices (shard_map); 0 = the largest divisor "
                       'of the cohort not above the number of cores')
  ap.add_argument('--profile_rounds', type=int, default=0,
                  help="after piece 1's timed rounds, profile this many more of ours per HLO operator (table in the report)")
  ap.add_argument('--out', required=True)
  args = ap.parse_args(argv)
  if args.rounds <= args.warmup:
    ap.error('--rounds must exceed --warmup')
  cohort = (SMALL if args.small else {}).get('cohort', 50)
  devices = args.cpu_devices or max(d for d in range(1, (os.cpu_count() or 1) + 1) if cohort % d == 0)
  if devices < 1 or cohort % devices:
    ap.error(f'--cpu_devices={devices}: expected a positive divisor of the cohort ({cohort} clients)')
  if 'jax' in sys.modules and devices > 1:
    ap.error('--cpu_devices needs a process in which JAX has not started (the host device count is set at start)')
  # Host devices must be asked for before JAX starts; any XLA_FLAGS of the caller are kept.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={devices}').strip()

  import jax
  from benchmarks.lib import pfl_cifar10 as pc

  os.makedirs(args.out, exist_ok=True)
  cfg = {**pc.CONFIG, **(SMALL if args.small else {})}
  assert cfg['cohort'] == cohort, 'SMALL/CONFIG cohort changed: update the device count rule above'
  data = pc.synthetic_cifar10(cfg['num_users'] * cfg['per_user'], cfg['num_test'], cfg['image'], cfg['classes'])
  users = pc.partition_iid(data['x_train'], data['y_train'], cfg['num_users'], cfg['per_user'])
  tmp = tempfile.mkdtemp(prefix='pfl_cpu_')
  npz = os.path.join(tmp, 'arrays.npz')
  np.savez(npz, users_x=users.x, users_y=users.y, x_test=data['x_test'], y_test=data['y_test'],
           cfg=json.dumps({**cfg, 'image': list(cfg['image'])}))
  del users
  rec = dict(command=' '.join([os.path.basename(sys.executable), 'benchmarks/pfl_cpu.py'] + sys.argv[1:]),
             cfg={**cfg, 'image': list(cfg['image'])}, pieces=args.pieces, rounds=args.rounds, warmup=args.warmup,
             threads=args.threads, cpu_devices=devices, xla_flags=os.environ['XLA_FLAGS'], cpu=cpu_name(),
             nproc=os.cpu_count(), python=platform.python_version(),
             versions=dict(jax=jax.__version__, jax_backend=jax.default_backend()), uptime_start=uptime(),
             data='synthetic_cifar10 (seed 0): CIFAR-10 shapes, no CIFAR-10 copy readable here', runs=[])

  def save():
    rec['uptime_end'] = uptime()
    rec['summary'] = summarise(rec['runs'], args.warmup)
    with open(os.path.join(args.out, 'pfl_cpu.json'), 'w') as f:
      json.dump(rec, f, indent=1, default=str)
    with open(os.path.join(args.out, 'pfl_cpu.md'), 'w') as f:
      f.write(markdown(rec))

  try:
    for i in range(args.pieces):
      piece = {}
      rec['runs'].append(piece)
      print(f'[pfl_cpu] piece {i + 1}/{args.pieces}: ours, {uptime()}', flush=True)
      piece['ours'] = pc.run(args.rounds, cfg, data=data, sync_rounds=True, conv_impl=args.conv, devices=devices,
                             profile_rounds=args.profile_rounds if i == 0 else 0)
      piece['ours']['uptime_after'] = uptime()
      save()
      print(f'[pfl_cpu] piece {i + 1}/{args.pieces}: pfl, {uptime()}', flush=True)
      path = os.path.join(tmp, f'pfl_{i}.json')
      cmd = [args.pfl_python, os.path.join(ROOT, 'benchmarks', 'pfl_cifar10_torch.py'), f'--rounds={args.rounds}',
             f'--out={path}', f'--data={npz}', f'--threads={args.threads}']
      rc = subprocess.run(cmd).returncode
      piece['pfl'] = json.load(open(path)) if os.path.exists(path) else {}
      piece['pfl']['uptime_after'] = uptime()
      if rc:
        piece['pfl']['error'] = f'rc {rc}'
      rec['versions']['pfl_engine'] = piece['pfl'].get('engine', rec['versions'].get('pfl_engine'))
      save()
  finally:
    for name in os.listdir(tmp):
      os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)
  save()
  print(markdown(rec), flush=True)


if __name__ == '__main__':
  main()
