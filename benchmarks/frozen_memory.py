"""Bytes a federation holds after setup with its frozen backbones in float32 or bfloat16.

  python benchmarks/frozen_memory.py --config=configs/gpt2_pair.py --dtype=bfloat16 \\
      --config.edge_model.backbone.hf=random:distilgpt2 --config.server_model.backbone.hf=random:gpt2-medium \\
      --config.text.instr_len=10 --config.data.num_clients=3 --config.data.num_device_types=1 \\
      --config.data.max_public_sequences=20

Builds the federation (`federation.init`) with both backbones' `frozen_dtype` set to --dtype and prints
one JSON line: the frozen backbones' bytes, the bytes of every live JAX array, the process RSS after
setup and its peak. One dtype per process, so that neither's peak is the other's. The memory of the
rounds themselves: the main job under `/usr/bin/time -v` (docs/own_data.md).
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

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/gpt2_pair.py', 'the federation')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', list(params.FROZEN_DTYPES), 'frozen_dtype of both backbones')


def _rss() -> int:
  with open('/proc/self/status') as f:
    return int(next(line for line in f if line.startswith('VmRSS')).split()[1]) * 1024


def main(argv):
  del argv
  cfg = _CONFIG.value
  for name in ('edge_model', 'server_model'):
    cfg[name].backbone.frozen_dtype = _DTYPE.value
  validate(cfg)
  t = time.time()
  with tempfile.TemporaryDirectory() as workdir:
    setup, _ = federation.init(cfg, workdir=workdir, log=lambda s: None)
    gc.collect()
    print(json.dumps({
        'frozen_dtype': _DTYPE.value, 'setup_s': round(time.time() - t, 1),
        'edge_frozen_bytes': params.count(setup.edge_frozen)[1],
        'server_frozen_bytes': params.count(setup.server_frozen)[1],
        'live_array_bytes': sum(x.nbytes for x in jax.live_arrays()), 'rss_after_setup': _rss(),
        'peak_rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == '__main__':
  app.run(main)
