"""Main-job scaling benchmark: setup, first-round (compile), steady round and evaluation time,
peak host RSS and device bytes against the number of clients and the participation.

  python benchmarks/scale_main.py --clients=50,1000 --fractions=1.0,0.05 --rounds=3

Each (clients, fraction) cell builds configs/scale_cpu.py at that size (host_state on, synthetic
data) and prints one markdown row; `sampled/s` is sampled clients trained per second of a steady
round. The key check (1,000 clients at 5% against 50 at 100%, same sampled count) is the ratio
of their steady round times, printed last when both cells ran.
"""
import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import scale_cpu  # noqa: E402
from ml_ecs import federation  # noqa: E402
from ml_ecs.validation import validate  # noqa: E402


def cell(n: int, fraction: float, rounds: int, host: bool) -> dict:
  cfg = scale_cpu.get_config(str(n))
  cfg.train.client_fraction, cfg.train.host_state = fraction, host
  cfg.pretrain.steps = 20
  validate(cfg)
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as wd:
    setup, state = federation.init(cfg, workdir=wd, log=lambda s: None)
    t_setup = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
      t = time.perf_counter()
      state, m = federation.run_round(setup, state)
      times.append(time.perf_counter() - t)
    t = time.perf_counter()
    federation.evaluate(setup, state)
    t_eval = time.perf_counter() - t
  steady = sum(times[1:]) / max(len(times) - 1, 1)
  dev = sum(getattr(x, 'nbytes', 0) for x in jax.live_arrays())
  return dict(clients=n, fraction=fraction, sampled=m['clients/sampled'], setup_s=t_setup, first_s=times[0],
              round_s=steady, eval_s=t_eval, sampled_per_s=m['clients/sampled'] / steady,
              rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, device_mb=dev / 2**20)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--clients', default='50,1000')
  ap.add_argument('--fractions', default='1.0,0.05')
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--device_state', action='store_true', help='host_state off (state on the devices)')
  a = ap.parse_args()
  rows = []
  print('| clients | fraction | sampled | setup s | first round s | round s | eval s | sampled/s | peak RSS GB | live device MB |')
  print('|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for n, f in zip([int(x) for x in a.clients.split(',')], [float(x) for x in a.fractions.split(',')]):
    r = cell(n, f, a.rounds, not a.device_state)
    rows.append(r)
    print(f"| {r['clients']} | {r['fraction']} | {r['sampled']} | {r['setup_s']:.1f} | {r['first_s']:.1f} | "
          f"{r['round_s']:.2f} | {r['eval_s']:.1f} | {r['sampled_per_s']:.1f} | {r['rss_gb']:.2f} | "
          f"{r['device_mb']:.0f} |", flush=True)
  if len(rows) >= 2:
    print(f"round time ratio {rows[-1]['clients']}@{rows[-1]['fraction']} / {rows[0]['clients']}@{rows[0]['fraction']}: "
          f"{rows[-1]['round_s'] / rows[0]['round_s']:.2f}x")


if __name__ == '__main__':
  main()
