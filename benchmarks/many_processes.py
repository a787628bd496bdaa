"""Rounds of one federation on 1 or many processes: client-steps per second, bytes crossing processes.

Run as every process of a local multi-process job (or alone):

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=1 \\
      --script=benchmarks/many_processes.py -- --clients=16 --rounds=5 --cache_dir=/tmp/bb
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/many_processes.py --clients=16

The federation is configs/tiny.py with `--clients` clients of 3 device types (modality sets
drawn). After one warm-up round (compilation), `--rounds` rounds are timed between barriers.
Bytes crossing processes are the loopback interface's transmitted bytes over the timed rounds
(/proc/net/dev `lo`: every byte one local process sends another, gloo collectives and the
coordination service, counted once; other loopback users of the machine add noise), next to
the communication accounting's bytes up + down of the same rounds. Process 0 prints one JSON
line (`result: {...}`) with the per-process bytes held and peak RSS.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root

from absl import app, flags

from ml_ecs.core import distributed

_CLIENTS = flags.DEFINE_integer('clients', 16, 'Edge clients.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds (after one warm-up round).')
_CACHE = flags.DEFINE_string('cache_dir', None, 'Pretrained backbone cache (shared by the runs).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process.')


def loopback_tx_bytes() -> int:
  """Bytes transmitted on the loopback interface since boot (/proc/net/dev)."""
  with open('/proc/net/dev') as f:
    for line in f:
      name, _, rest = line.partition(':')
      if name.strip() == 'lo':
        return int(rest.split()[8])
  return 0


def main(argv):
  del argv
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax
  import numpy as np
  from configs import tiny
  from ml_ecs.core import federation
  from jax.experimental import multihost_utils
  cfg = tiny.get_config()
  cfg.data.num_clients = _CLIENTS.value
  cfg.data.modality_sets = ()
  cfg.train.rounds = _ROUNDS.value + 1
  setup, state = federation.init(cfg, log=lambda s: None, cache_dir=_CACHE.value)
  state, _ = federation.run_round(setup, state)   # compilation
  steps = sum(c.num_sampled for c in setup.cohorts) * (cfg.train.public_steps + cfg.train.private_steps)
  distributed.barrier('timed_rounds')
  tx0, t0, comm = loopback_tx_bytes(), time.perf_counter(), 0.0
  for _ in range(_ROUNDS.value):
    state, row = federation.run_round(setup, state)
    comm += row['comm/bytes_up'] + row['comm/bytes_down']
  jax.block_until_ready(state)
  distributed.barrier('timed_rounds_done')
  seconds, tx = time.perf_counter() - t0, loopback_tx_bytes() - tx0
  held = federation.process_holdings(setup, state)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  mb = np.array([held['client_data_bytes'], held['client_state_bytes'], held['replicated_bytes'], rss]) / 1e6
  per_process = multihost_utils.process_allgather(mb.astype(np.float32))   # MB (JAX's default 32-bit types)
  if distributed.is_main():
    per_process = np.asarray(per_process).reshape(-1, 4)
    result = {'processes': jax.process_count(), 'devices': jax.device_count(), 'clients': _CLIENTS.value,
              'rounds': _ROUNDS.value, 'round_s': seconds / _ROUNDS.value,
              'client_steps_per_s': steps * _ROUNDS.value / seconds,
              'loopback_bytes_per_round': tx / _ROUNDS.value if jax.process_count() > 1 else 0.0,
              'accounting_bytes_per_round': comm / _ROUNDS.value,
              'client_data_mb': per_process[:, 0].tolist(), 'client_state_mb': per_process[:, 1].tolist(),
              'replicated_mb': per_process[:, 2].tolist(), 'peak_rss_mb': per_process[:, 3].tolist()}
    print('result: ' + json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
