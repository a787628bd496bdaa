"""The GPT-2 pair at its real sizes (configs/gpt2_pair.py with random weights: distilgpt2-sized edge,
gpt2-medium-sized server; no hub) with its frozen weights held in float32 or bfloat16: setup, rounds,
memory and communication, one JSON line.

  python benchmarks/realistic_pair.py --dtype=bfloat16                # setup only (about 80 s on 2 CPU cores)
  python benchmarks/realistic_pair.py --dtype=float32 --rounds=2      # and two rounds (about 10 minutes)

The federation: 3 clients in one cohort, the public split capped at 20 recordings
(`--config.*` overrides any field, e.g. `--config.edge_model.backbone.hf=PATH` for a checkpoint). The line
holds the frozen backbones' bytes, the bytes of every live JAX array and the process RSS after setup, the
seconds of each round (the first compiles), `comm/ratio`, and the peak: the device's peak bytes in use
where JAX reports it (GPU/TPU), else the process's peak RSS. One dtype per process, so that neither's
peak is the other's. Run by benchmarks/device_check.py (part `pair`) for both dtypes.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root

import jax
from absl import app, flags
from ml_collections import config_flags

from ml_ecs.config.validation import validate
from ml_ecs.core import federation
from ml_ecs.models import params
from studies.compare.grid import set_fields

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/gpt2_pair.py', 'the federation (the pair by default)')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', list(params.FROZEN_DTYPES), 'frozen_dtype of both backbones')
_ROUNDS = flags.DEFINE_integer('rounds', 0, 'rounds to run and time after setup', lower_bound=0)
_OUT = flags.DEFINE_string('out', '', 'also write the JSON line to this file')

# The pair without a hub, at a size two CPU cores run (docs/own_data.md): what `--config.*` starts from.
PAIR = {'edge_model.backbone.hf': 'random:distilgpt2', 'server_model.backbone.hf': 'random:gpt2-medium',
        'text.instr_len': 10, 'data.num_clients': 3, 'data.num_device_types': 1, 'data.max_public_sequences': 20,
        'eval.max_test_per_client': 8, 'eval.max_server_test': 16}


def _rss() -> int:
  with open('/proc/self/status') as f:
    return int(next(line for line in f if line.startswith('VmRSS')).split()[1]) * 1024


def _peak() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return {'peak_device_bytes': int(stats['peak_bytes_in_use'])}
  return {'peak_rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure(cfg, dtype: str, rounds: int) -> dict:
  """The JSON line's fields for config `cfg` with both frozen backbones held in `dtype`."""
  for name in ('edge_model', 'server_model'):
    cfg[name].backbone.frozen_dtype = dtype
  validate(cfg)
  t = time.time()
  with tempfile.TemporaryDirectory() as workdir:
    setup, state = federation.init(cfg, workdir=workdir, log=lambda s: None)
    gc.collect()
    out = {'frozen_dtype': dtype, 'device': jax.devices()[0].device_kind, 'setup_s': round(time.time() - t, 1),
           'edge_frozen_bytes': params.count(setup.edge_frozen)[1],
           'server_frozen_bytes': params.count(setup.server_frozen)[1],
           'live_array_bytes': sum(x.nbytes for x in jax.live_arrays()), 'rss_after_setup': _rss(), 'round_s': []}
    for _ in range(rounds):
      t = time.time()
      state, row = federation.run_round(setup, state)
      jax.block_until_ready(state)
      out['round_s'].append(round(time.time() - t, 1))
      out['comm_ratio'] = row['comm/ratio']
  return {**out, **_peak()}


def main(argv):
  del argv
  cfg = _CONFIG.value
  overridden = {a[len('--config.'):].split('=')[0] for a in sys.argv[1:] if a.startswith('--config.')}
  if cfg.edge_model.backbone.hf == 'distilgpt2':   # the pair's hub names: its random-weight build instead
    set_fields(cfg, {field: value for field, value in PAIR.items() if field not in overridden})
  line = json.dumps(measure(cfg, _DTYPE.value, _ROUNDS.value))
  print(line, flush=True)
  if _OUT.value:   # whole or not at all
    tmp = _OUT.value + '.tmp'
    with open(tmp, 'w') as f:
      f.write(line + '\n')
    os.replace(tmp, _OUT.value)


if __name__ == '__main__':
  app.run(main)
