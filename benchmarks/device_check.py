"""The accelerator check, one short script (run by benchmarks/device_check.sh).

Modes:
  sanity  ~30 s: versions, devices, that pfl / drjax / torch import, one tiny cohort cell, 3 FedAvg rounds
  small   CPU-sized (tests/integration/test_device_check.py): the same pieces at toy sizes, pfl skipped without torch
  full    ~6 min on one GPU: the cohort round at accelerator sizes (ours / ours_vmap / drjax / limit / loop, 256-4096
          clients), pfl's CIFAR-10 workload on our engine and on pfl itself (torch backend, a subprocess), and MFU;
          then the realistic GPT-2 pair (benchmarks/realistic_pair.py: setup, 2 rounds, peak memory, comm ratio)
          with its frozen weights in float32 and in bfloat16, ~2-4 min more; then comparison cells as one program
          of R runs against separate runs (benchmarks/runs_program.py: R = 1, 10, on collaborate.py:pairs), ~5 min,
          and from them the whole protocol (collaborate.py pairs and singles) projected for this device
          (benchmarks/protocol_cost.py); alone: --skip=cohort,fedavg,pfl,pair

Results go to --out as they come (a timeout still leaves data): env.json, cohort.json, fedavg_ours.json,
pfl_torch.json (+ pfl_torch.log), pair.json, runs/runs_program.{json,md}, runs/protocol_cost.{json,md}, summary.md;
the summary table is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Peak dense throughput of one H100 SXM (NVIDIA datasheet): what MFU divides by.
PEAK_FLOPS = {'h100_bf16_dense': 989e12, 'h100_tf32_dense': 494e12, 'h100_fp32_nontensor': 67e12}

MODES = {
    # cohort grid: (workload, clients) cells; variants; round chunk; cell budget
    'sanity': dict(cells=[('small', 4)], variants=['ours@1'], width=32, layers=1, heads=2, samples=8, round_chunk=0,
                   cell_budget_s=20, cohort_budget_s=25, fedavg=dict(rounds=3, cfg=dict(num_users=20, per_user=10,
                   cohort=5, num_test=200, eval_every=3)), fedavg_budget_s=20, pfl_rounds=3, pfl_small=True,
                   pfl_budget_s=60, pair=dict(config='', dtypes=(), rounds=0, budget_s=0), runs=None),
    'small': dict(cells=[('small', 4)], variants=['ours@1', 'drjax@1'], width=16, layers=1, heads=2, samples=4,
                  round_chunk=2, cell_budget_s=60, cohort_budget_s=240, fedavg=dict(rounds=2, cfg=dict(
                  num_users=8, per_user=10, cohort=4, num_test=100, eval_every=2, image=(8, 8, 3))),
                  fedavg_budget_s=20, pfl_rounds=2, pfl_small=True, pfl_budget_s=60,
                  pair=dict(config='configs/tiny.py', dtypes=('bfloat16',), rounds=1, budget_s=500), runs=None),
    'full': dict(cells=[('large', 256), ('large', 1024), ('large', 4096), ('small', 4096)],
                 variants=['loop', 'limit', 'drjax'], width=64, layers=2, heads=4, samples=64, round_chunk=256,
                 cell_budget_s=20, cohort_budget_s=170, fedavg=dict(rounds=1500, cfg={}), fedavg_budget_s=50,
                 pfl_rounds=1500, pfl_small=False, pfl_budget_s=70,
                 pair=dict(config='configs/gpt2_pair.py', dtypes=('float32', 'bfloat16'), rounds=2, budget_s=240),
                 runs=dict(sizes='1,10', separate=2, rounds=3, budget_s=540,
                           config='studies/compare/configs/collaborate.py:pairs',
                           protocols=('studies/compare/configs/collaborate.py:pairs',
                                      'studies/compare/configs/collaborate.py:singles'))),
}


def log(msg: str) -> None:
  print(msg, flush=True)


def dump(out: str, name: str, obj) -> None:
  with open(os.path.join(out, name), 'w') as f:
    json.dump(obj, f, indent=1, default=str)


def env_info() -> dict:
  info = dict(python=platform.python_version(), argv=sys.argv)
  for mod in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'drjax', 'pfl', 'torch', 'ml_collections', 'rouge_score'):
    try:
      m = __import__(mod)
      info[mod] = getattr(m, '__version__', 'imported')
    except Exception as e:  # noqa: BLE001  (record why, keep going)
      info[mod] = f'not importable: {type(e).__name__}: {e}'[:200]
  import jax
  info.update(backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
              device_kind=jax.devices()[0].device_kind)
  try:
    import torch
    info['torch_cuda'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda'
  except Exception:  # noqa: BLE001
    pass
  return info


def cohort(mode: dict, out: str, deadline: float) -> list[dict]:
  """The cohort round variants on the accelerator (1 device), rows written as they come."""
  from benchmarks.lib import throughput as bm
  rows: list[dict] = []
  by_workload: dict[str, list[int]] = {}
  for wl, c in mode['cells']:
    by_workload.setdefault(wl, []).append(c)
  for wl, clients in by_workload.items():   # one run_cells per workload: time/memory projected across sizes
    r, _ = bm.run_cells(clients, [wl], mode['variants'], steps=1, repeats=3, width=mode['width'], layers=mode['layers'],
                        heads=mode['heads'], chunks=[], budget_s=mode['cell_budget_s'], max_mem=48 * 2**30,
                        samples=mode['samples'], seed=0, deadline=deadline, round_devices=(1,),
                        round_chunk=mode['round_chunk'], on_row=lambda row: log('[cohort] ' + bm.fmt_row(row)))
    rows += r
    dump(out, 'cohort.json', rows)
  return rows


def mfu(flops: float | None, seconds: float | None) -> dict:
  if not flops or not seconds:
    return {}
  achieved = flops / seconds
  return dict(achieved_tflops=achieved / 1e12, **{f'mfu_{k}': achieved / v for k, v in PEAK_FLOPS.items()})


def fedavg_ours(mode: dict, out: str) -> dict:
  from benchmarks.lib import pfl_cifar10 as pc
  f = mode['fedavg']
  res = pc.run(f['rounds'], f['cfg'], log=log, time_budget_s=mode['fedavg_budget_s'])
  res['mfu_round'] = mfu(res.get('round_flops_xla'), res['s_per_round'])
  dump(out, 'fedavg_ours.json', res)
  return res


def pfl_torch(mode: dict, out: str) -> dict:
  """pfl itself, in a subprocess (its own CUDA context; jax in this process holds its memory pool)."""
  try:
    import pfl  # noqa: F401
    import torch  # noqa: F401
  except Exception as e:  # noqa: BLE001
    res = dict(skip=f'pfl/torch not importable here: {type(e).__name__}: {e}'[:300])
    dump(out, 'pfl_torch.json', res)
    return res
  path = os.path.join(out, 'pfl_torch.json')
  cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'pfl_cifar10_torch.py'), f'--rounds={mode["pfl_rounds"]}',
         f'--out={path}', f'--time_budget_s={mode["pfl_budget_s"]}'] + (['--small'] if mode['pfl_small'] else [])
  with open(os.path.join(out, 'pfl_torch.log'), 'w') as logf:
    try:
      rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=mode['pfl_budget_s'] + 90).returncode
    except subprocess.TimeoutExpired:
      rc = 'timeout'
  res = json.load(open(path)) if os.path.exists(path) else {}
  if rc != 0:
    res['error'] = f'rc {rc}: see pfl_torch.log'
  dump(out, 'pfl_torch.json', res)
  return res


def pair(mode: dict, out: str) -> list[dict]:
  """benchmarks/realistic_pair.py once per frozen dtype, each in its own process (its own peak)."""
  p, rows = mode['pair'], []
  for dtype in p['dtypes']:
    path = os.path.join(out, f'pair_{dtype}.json')
    cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'realistic_pair.py'), f'--config={p["config"]}',
           f'--dtype={dtype}', f'--rounds={p["rounds"]}', f'--out={path}']
    try:
      res = subprocess.run(cmd, capture_output=True, text=True, timeout=p['budget_s'], cwd=ROOT)
      row = json.load(open(path)) if res.returncode == 0 else dict(
          frozen_dtype=dtype, skip=f'rc {res.returncode}: {res.stderr.strip().splitlines()[-1:]}'[:300])
    except subprocess.TimeoutExpired:
      row = dict(frozen_dtype=dtype, skip=f'over its budget of {p["budget_s"]} s')
    if os.path.exists(path):
      os.remove(path)   # its line is in pair.json
    log(f'[pair] {json.dumps(row)}')
    rows.append(row)
    dump(out, 'pair.json', rows)
  return rows


def runs(mode: dict, out: str, script: str = os.path.join(ROOT, 'benchmarks', 'runs_program.py')) -> dict:
  """benchmarks/runs_program.py (`script`): R comparison cells as one program against R separate runs; then the
  protocol projected from what it measured, also when it stopped early."""
  p = mode['runs']
  if not p:
    return dict(skip='not in this mode')
  cmd = [sys.executable, script, f'--runs={p["sizes"]}',
         f'--separate={p["separate"]}', f'--rounds={p["rounds"]}', f'--config={p["config"]}',
         f'--out={os.path.join(out, "runs")}']
  measured = os.path.join(out, 'runs', 'runs_program.json')
  # Its own process group, so a timeout also ends the piece it is measuring (a subprocess of its own).
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          start_new_session=True)
  try:
    _, err = proc.communicate(timeout=p['budget_s'])
    failed = f'rc {proc.returncode}: {err.strip().splitlines()[-1:]}'[:300] if proc.returncode else ''
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    failed = f'over its budget of {p["budget_s"]} s'
  if failed:   # the pieces measured before it stopped are in runs_program.json (complete: false)
    partial = json.load(open(measured)) if os.path.exists(measured) else {}
    if not partial.get('programs'):
      return dict(skip=failed)
    table = f'runs_program.py stopped ({failed}); programs measured: {sorted(partial["programs"], key=int)}\n'
  else:
    with open(os.path.join(out, 'runs', 'runs_program.md')) as f:
      table = f.read()
  # The whole protocol on this device, projected from these programs (benchmarks/protocol_cost.py).
  cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'protocol_cost.py'),
         f'--measured={measured}', f'--out={os.path.join(out, "runs")}',
         *(f'--config={c}' for c in p['protocols'])]
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if res.returncode:
    return dict(table=table + f'\nprotocol projection failed: {res.stderr.strip()[-300:]}\n')
  return dict(table=table + '\n' + res.stdout)


def summary(env: dict, rows: list[dict], ours: dict, pfl: dict, pairs: list[dict] | None = None,
            runs_: dict | None = None) -> str:
  from benchmarks.lib import throughput as bm
  L = ['# device check', '', f"device: {env.get('device_kind')} ({env.get('backend')}), jax {env.get('jax')}, "
       f"torch {env.get('torch')}, pfl {env.get('pfl')}, drjax {env.get('drjax')}", '',
       '## cohort round (client-steps/s; one device)', '',
       '| workload | clients | variant | client-steps/s | s/call | peak MiB | TFLOP/s | MFU bf16 / fp32 | notes |',
       '|---|---:|---|---:|---:|---:|---:|---|---|']
  for r in rows:
    if 'skip' in r:
      L.append(f"| {r['workload']} | {r['clients']} | {r['variant']} | skipped | | | | | {r['skip'][:120]} |")
      continue
    m = mfu(r.get('flops'), r['median_s'])
    L.append(f"| {r['workload']} | {r['clients']} | {r['variant']} | {r['client_steps_per_s']:,.0f} | "
             f"{r['median_s']:.4f} | {r['peak_bytes'] / 2**20:,.0f} | "
             + (f"{m['achieved_tflops']:.2f} | {100 * m['mfu_h100_bf16_dense']:.2f}% / "
                f"{100 * m['mfu_h100_fp32_nontensor']:.1f}%" if m else 'n/a | n/a') + f" | {r.get('notes', '')} |")
  hs = bm.headline_rows(rows)
  if hs:
    L += ['', '| workload | clients | ours/drjax | ours_vmap/drjax | peak ours/drjax | ours/loop | ours/limit |',
          '|---|---:|---:|---:|---:|---:|---:|']
    L += [f"| {h['workload']} | {h['clients']} | {h.get('ours_drjax@1')} | {h.get('oursvmap_drjax@1')} | "
          f"{h.get('mem_ours_drjax@1')} | {h['ours_loop']} | {h['ours_limit']} |" for h in hs]
  L += ['', "## pfl-research CIFAR-10 benchmark (1000 users x 50, cohort 50, batch 10; synthetic CIFAR-shaped data)", '',
        '| engine | rounds run | s/round | s/100 rounds | steady s/round | final accuracy | MFU of the round |',
        '|---|---:|---:|---:|---:|---:|---|']
  for res in (ours, pfl):
    if not res or 'skip' in res or 'rounds' not in res:
      why = (res or {}).get('skip') or (res or {}).get('error') or 'not run'
      L.append(f"| {(res or {}).get('engine', '-')} | skipped: {why} | | | | | |")
      continue
    m = res.get('mfu_round') or {}
    L.append(f"| {res['engine']} | {res['rounds']} | {res['s_per_round']:.4f} | {res['s_per_100_rounds']:.2f} | "
             f"{res.get('steady_s_per_round') or ''} | {res.get('final_accuracy')} | "
             + (f"{m['achieved_tflops']:.2f} TFLOP/s, {100 * m['mfu_h100_bf16_dense']:.2f}% of bf16 peak"
                if m else '') + ' |')
  if ours.get('s_per_round') and pfl.get('s_per_round'):
    L += ['', f"ours/pfl speed (pfl s/round over ours): {pfl['s_per_round'] / ours['s_per_round']:.2f}x"]
  if pairs:
    mb = lambda b: f'{b / 2**20:,.0f}'
    L += ['', '## the realistic pair (benchmarks/realistic_pair.py; frozen weights held in float32 / bfloat16)', '',
          '| frozen dtype | setup s | rounds s | frozen MiB (edge + server) | live MiB after setup | peak MiB | '
          'comm ratio |', '|---|---:|---|---|---:|---:|---:|']
    for r in pairs:
      if 'skip' in r:
        L.append(f"| {r['frozen_dtype']} | skipped: {r['skip'][:120]} | | | | | |")
        continue
      peak = r.get('peak_device_bytes', r.get('peak_rss', 0))
      L.append(f"| {r['frozen_dtype']} | {r['setup_s']} | {', '.join(map(str, r['round_s']))} | "
               f"{mb(r['edge_frozen_bytes'])} + {mb(r['server_frozen_bytes'])} | {mb(r['live_array_bytes'])} | "
               f"{mb(peak)} ({'device' if 'peak_device_bytes' in r else 'RSS'}) | {r.get('comm_ratio', '')} |")
  if runs_ and 'table' in runs_:
    L += ['', '## runs as one program (benchmarks/runs_program.py)', '', runs_['table']]
  elif runs_:
    L += ['', f"runs as one program: skipped: {runs_['skip']}"]
  return '\n'.join(L) + '\n'


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--mode', choices=sorted(MODES), default='full')
  ap.add_argument('--out', required=True)
  ap.add_argument('--skip', default='', help='comma-separated parts to skip: cohort,fedavg,pfl,pair,runs')
  args = ap.parse_args(argv)
  mode, skip = MODES[args.mode], set(filter(None, args.skip.split(',')))
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  env = env_info()
  env['mode'] = args.mode
  dump(args.out, 'env.json', env)
  log(f'[env] {json.dumps(env)}')
  rows, ours, pfl = [], {}, {}
  parts = [('cohort', lambda: cohort(mode, args.out, time.time() + mode['cohort_budget_s'])),
           ('fedavg', lambda: fedavg_ours(mode, args.out)), ('pfl', lambda: pfl_torch(mode, args.out)),
           ('pair', lambda: pair(mode, args.out)), ('runs', lambda: runs(mode, args.out))]
  results = {}
  for name, fn in parts:
    if name in skip:
      continue
    t = time.time()
    try:
      results[name] = fn()
    except Exception as e:  # noqa: BLE001  (a failed part must not lose the others)
      traceback.print_exc()
      results[name] = dict(skip=f'error: {type(e).__name__}: {e}'[:300])
    log(f'[{name}] done in {time.time() - t:.0f} s')
    rows = results.get('cohort') if isinstance(results.get('cohort'), list) else []
    ours, pfl = results.get('fedavg') or {}, results.get('pfl') or {}
    pairs = results.get('pair') if isinstance(results.get('pair'), list) else []
    text = summary(env, rows, ours, pfl, pairs, results.get('runs'))
    with open(os.path.join(args.out, 'summary.md'), 'w') as f:
      f.write(text)
  log(text)
  log(f'[device_check] {args.mode} done in {time.time() - t0:.0f} s; files in {args.out}')


if __name__ == '__main__':
  main()
