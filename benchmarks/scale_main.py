"""Main-job scaling benchmark: setup, first-round (compile), steady round and evaluation time,
host RSS, host bytes per client and live device bytes against the number of clients and the
participation fraction, and the main job's sampled clients per second against the
micro-benchmark's vmapped cohort (benchmarks/lib/throughput.py) of the same count and work.

  python benchmarks/scale_main.py --cells=50:1.0,1000:0.05 --out=benchmarks/results/scale_main.jsonl
  # against the federation's size at a fixed sampled count (16), then against the participation fraction:
  python benchmarks/scale_main.py --cells=16:1,64:0.25,256:0.0625,1024:0.015625,4096:0.00390625 --clients_per_eval=16
  python benchmarks/scale_main.py --cells=1024:0.03125,1024:0.0625,1024:0.125 --clients_per_eval=16

Each cell (clients:fraction) builds studies/scale/configs/scale_cpu.py at that size (synthetic data,
host_state) in its own subprocess (so peak RSS is the cell's), runs --rounds rounds and one
sampled evaluation, and appends one JSON row to --out as soon as it finishes; a rerun skips
the cells already there (resumable). Pretrained backbones are cached in --cache_dir and
shared by every cell. `--micro` adds, per distinct sampled count, the micro-benchmark's
`vmap` variant on a cohort of that many clients running the same optimizer steps per client
(public + private steps, batch, sequence length, edge model); its clients per second over
the main job's is the main job's overhead. The Markdown table of all rows is printed last.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _median(values: list[float]) -> float:
  return sorted(values)[len(values) // 2]


def _steady_median(values: list[float]) -> float:
  """The median of the rounds after the first (which compiles); the only value if there is one round."""
  return _median(values[1:] or values)


def kernel_times(setup, state, repeats: int) -> dict:
  """The round's compiled work alone: each cohort's round function on the block the next round would run
  (copies of its inputs, as they are donated), then the server's round function, each timed to its result;
  the medians over `repeats`. `round_s` over their sum is what the round adds to its kernels (host work,
  transfers, waiting)."""
  import jax
  import jax.numpy as jnp
  from ml_ecs.core import round as round_lib
  keys = round_lib.round_keys(state)
  alignment, _ = setup.algorithm.round_context(setup, state)
  broadcast = round_lib.broadcast_args(setup, state, alignment)
  drawn = [round_lib.sample(c, keys, k) for k, c in enumerate(setup.cohorts)]
  copy = lambda tree: jax.block_until_ready(jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree))
  server_in = round_lib.server_args(setup, state, keys.server, state.server_z, jnp.zeros(setup.num_public, bool))
  cohorts, server = [], []
  for _ in range(repeats):
    per = []
    for c, cs, (ck, _, sel) in zip(setup.cohorts, state.cohorts, drawn):
      args = copy(round_lib.cohort_args(setup, c, cs, sel, ck, broadcast))
      t = time.perf_counter()
      jax.block_until_ready(c.round_fn(*args))
      per.append(time.perf_counter() - t)
    cohorts.append(per)
    args = copy(server_in)
    t = time.perf_counter()
    jax.block_until_ready(setup.server_round_fn(*args))
    server.append(time.perf_counter() - t)
  return dict(cohort_kernels_s=_median([sum(p) for p in cohorts]),
              cohort_kernel_s=[_median([p[k] for p in cohorts]) for k in range(len(setup.cohorts))],
              server_kernel_s=_median(server))


def main_cell(n: int, fraction: float, rounds: int, cache_dir: str, pretrain_steps: int,
              clients_per_eval: int = 0, kernel_repeats: int = 0) -> dict:
  """One main-job cell, in this process."""
  import jax
  import tempfile
  from studies.scale.configs import scale_cpu
  from ml_ecs.core import federation
  from ml_ecs.config.validation import validate
  cfg = scale_cpu.get_config(str(n))
  cfg.train.client_fraction = fraction
  cfg.pretrain.steps = pretrain_steps
  if clients_per_eval:
    cfg.eval.clients_per_eval = clients_per_eval
  validate(cfg)
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as wd:
    setup, state = federation.init(cfg, workdir=wd, log=lambda s: None, cache_dir=cache_dir)
  setup_s = time.perf_counter() - t0
  times, parts = [], []
  for _ in range(rounds):
    t = time.perf_counter()
    state, m = federation.run_round(setup, state)
    times.append(time.perf_counter() - t)
    parts.append({k[len('time/'):-len('_s')]: v for k, v in m.items() if k.startswith('time/') and k != 'time/round_s'})
  kernels = kernel_times(setup, state, kernel_repeats) if kernel_repeats else {}
  t = time.perf_counter()
  ev = federation.evaluate(setup, state)
  eval_s = time.perf_counter() - t
  steady = _steady_median(times)
  sampled = m['clients/sampled']
  te = cfg.train
  return dict(kind='main', clients=n, fraction=fraction, sampled=sampled, rounds=rounds, setup_s=setup_s,
              first_round_s=times[0], round_s=steady, round_times=times, eval_s=eval_s,
              evaluated=ev.get('client/evaluated', n), sampled_per_s=sampled / steady,
              host_bytes_per_client=federation.host_bytes_per_client(setup, state),
              peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              live_device_mb=sum(x.nbytes for x in jax.live_arrays()) / 2**20,
              steps_per_client=te.public_steps + te.private_steps, batch=te.batch_size,
              seq=len(setup.text.instr) + cfg.edge_model.prompt_len + cfg.text.answer_len - 1,
              compiles=[c.round_fn._cache_size() for c in setup.cohorts],
              # the round's parts (ml_ecs/core/round.py's time/*_s), each the median over the steady rounds
              parts_s={k: _steady_median([p[k] for p in parts]) for k in parts[0]}, **kernels)


def micro_cell(clients: int, steps: int, batch: int, seq: int) -> dict:
  """The micro-benchmark's vmapped cohort of `clients` clients running `steps` steps each."""
  from configs import default
  from benchmarks.lib import throughput as bm
  e = default.get_config().edge_model.backbone
  s = bm.make_setup(clients, 'small', steps, width=e.width, layers=e.layers, heads=e.heads, batch=batch, seq=seq)
  row = bm.time_variant(bm.make_variant(s, 'vmap'), repeats=2, budget_s=600, max_mem=8 * 2**30)
  return dict(kind='micro', clients=clients, steps_per_client=steps, batch=batch, seq=seq,
              round_s=row.get('median_s'), compile_s=row.get('compile_s'),
              sampled_per_s=clients / row['median_s'] if row.get('median_s') else None, skip=row.get('skip'))


def _rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _append(path: str, row: dict) -> None:
  """One finished cell's row, with the load average and the environment it ran in, appended to `path`."""
  from ml_ecs.run.environment import environment
  row.update(loadavg=os.getloadavg(), environment=environment())
  with open(path, 'a') as fh:
    fh.write(json.dumps(row) + '\n')


def _run_child(args: list[str], timeout_s: int) -> dict:
  res = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                       timeout=timeout_s, cwd=ROOT)
  if res.returncode != 0:
    raise RuntimeError(f'cell {args} failed:\n{res.stderr[-3000:]}')
  return json.loads(res.stdout.strip().splitlines()[-1])


def _steady(row: dict) -> str:
  """The steady rounds (after the first): the median the ratios use, and their range."""
  t = row['round_times'][1:]
  return f"{row['round_s']:.2f} ({min(t):.2f}-{max(t):.2f})" if len(t) > 1 else f"{row['round_s']:.2f}"


def _micro_rows(rows: list[dict]) -> dict:
  """The micro-benchmark rows by (clients, steps per client)."""
  return {(r['clients'], r['steps_per_client']): r for r in rows if r['kind'] == 'micro'}


def markdown(rows: list[dict]) -> list[str]:
  """The table of main-job rows, each with the micro-benchmark's clients/s at its sampled count."""
  micro = _micro_rows(rows)
  out = ['| clients | fraction | sampled | setup s | first round s | round s (range) | eval s (evaluated) | sampled/s | '
         'micro vmap/s | micro / main | host KB/client | peak RSS GB | live device MB | compiles |',
         '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in (r for r in rows if r['kind'] == 'main'):
    mc = micro.get((r['sampled'], r['steps_per_client']), {}).get('sampled_per_s')
    ratio = f"{mc / r['sampled_per_s']:.2f}x" if mc else '-'
    out.append(f"| {r['clients']} | {r['fraction']:g} | {r['sampled']} | {r['setup_s']:.1f} | "
               f"{r['first_round_s']:.1f} | {_steady(r)} | {r['eval_s']:.1f} ({r['evaluated']}) | "
               f"{r['sampled_per_s']:.2f} | {f'{mc:.2f}' if mc else '-'} | "
               f"{ratio} | {r['host_bytes_per_client'] / 1e3:.0f} | "
               f"{r['peak_rss_gb']:.2f} | {r['live_device_mb']:.0f} | {r.get('compiles', '-')} |")
  return out


def kernels_markdown(main_rows: list[dict], rows: list[dict]) -> list[str]:
  """The round against its own compiled work (`kernel_times`) and against the micro-benchmark."""
  micro = _micro_rows(rows)
  out = ['| clients | sampled | round s | cohort kernels s (each) | server kernel s | round / kernels | '
         'round / cohort kernels | cohort kernels / micro | round / micro |',
         '|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in main_rows:
    ck, sk = r['cohort_kernels_s'], r['server_kernel_s']
    m = micro.get((r['sampled'], r['steps_per_client']), {}).get('round_s')
    each = ', '.join(f'{v:.2f}' for v in r['cohort_kernel_s'])
    by_micro = (f"{ck / m:.2f}x", f"{r['round_s'] / m:.2f}x") if m else ('-', '-')
    out.append(f"| {r['clients']} | {r['sampled']} | {r['round_s']:.2f} | {ck:.2f} ({each}) | {sk:.2f} | "
               f"{r['round_s'] / (ck + sk):.2f}x | {r['round_s'] / ck:.2f}x | {by_micro[0]} | {by_micro[1]} |")
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--cells', default='50:1.0,1000:0.05', help='clients:fraction,...')
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'scale_main.jsonl'))
  ap.add_argument('--cache_dir', default=os.path.join(ROOT, 'benchmarks', 'results', 'scale_cache'))
  ap.add_argument('--pretrain_steps', type=int, default=300)
  ap.add_argument('--compile_cache', default='',
                  help='persistent XLA compilation cache shared by the cells (a cell whose shapes match an earlier '
                       "cell's loads its compiled functions: its first round then shows that compile cost does not "
                       'grow with the federation); empty: every cell compiles cold')
  ap.add_argument('--clients_per_eval', type=int, default=0, help="evaluated clients (0: the config's 64)")
  ap.add_argument('--micro', action='store_true', help='also the micro-benchmark at each sampled count')
  ap.add_argument('--kernels', type=int, default=0,
                  help="also time the round's compiled functions alone (each cohort's, the server's), median of "
                       'this many repeats, in the main cell after its rounds; 0: not measured')
  ap.add_argument('--cell_timeout_s', type=int, default=3600)
  ap.add_argument('--child', default='', help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:   # one cell in this (child) process: its row as the last stdout line
    if a.compile_cache:
      from ml_ecs.run.compilation_cache import enable_compilation_cache
      enable_compilation_cache(a.compile_cache)
    kind, *vals = a.child.split(':')
    row = (main_cell(int(vals[0]), float(vals[1]), a.rounds, a.cache_dir, a.pretrain_steps, a.clients_per_eval,
                     a.kernels)
           if kind == 'main'
           else micro_cell(*map(int, vals)))
    print(json.dumps(row))
    return
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  todo = [(int(n), float(f)) for n, f in (c.split(':') for c in a.cells.split(','))]
  for n, f in todo:
    rows = _rows(a.out)
    main_row = next((r for r in rows if r['kind'] == 'main' and (r['clients'], r['fraction']) == (n, f)), None)
    if main_row is None:
      t = time.time()
      main_row = _run_child([f'--child=main:{n}:{f}', f'--rounds={a.rounds}', f'--cache_dir={a.cache_dir}',
                             f'--pretrain_steps={a.pretrain_steps}', f'--clients_per_eval={a.clients_per_eval}',
                             f'--compile_cache={a.compile_cache}', f'--kernels={a.kernels}'],
                            a.cell_timeout_s)
      _append(a.out, main_row)
      print(f'main {n}@{f}: round {main_row["round_s"]:.2f} s ({time.time() - t:.0f} s)', flush=True)
    key = (main_row['sampled'], main_row['steps_per_client'])
    if a.micro and key not in _micro_rows(rows):
      mrow = _run_child([f"--child=micro:{key[0]}:{key[1]}:{main_row['batch']}:{main_row['seq']}"],
                        a.cell_timeout_s)
      _append(a.out, mrow)
  rows = _rows(a.out)
  print('\n'.join(markdown(rows)))
  kernel_rows = [r for r in rows if r['kind'] == 'main' and 'cohort_kernels_s' in r]
  if kernel_rows:
    print('\n'.join(kernels_markdown(kernel_rows, rows)))
  by = {(r['clients'], r['fraction']): r for r in rows if r['kind'] == 'main'}
  if (1000, 0.05) in by and (50, 1.0) in by:
    print(f"round time 1000 clients @5% / 50 clients @100%: {by[1000, 0.05]['round_s'] / by[50, 1.0]['round_s']:.2f}x")


if __name__ == '__main__':
  main()
