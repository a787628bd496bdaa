"""Where one main-job run's start-up goes: the run's wall time and JAX's own tracing, lowering and XLA
compilation seconds (its monitoring events), one JSON line. XLA flags come from the environment, so compare
flag sets by running it under each in turn: once to pretrain the backbones for those flags (the backbone
cache is keyed by them; that line says `"pretrained": true` and is not a compile measurement), then from an
empty compilation cache (cold) and again (warm):

  for f in "" "--xla_cpu_use_fusion_emitters=false"; do
    export XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true $f"
    rm -rf /tmp/ct_fill; python benchmarks/compile_time.py --cache=/tmp/ct_fill
    rm -rf /tmp/ct_cache; for k in cold warm; do python benchmarks/compile_time.py --cache=/tmp/ct_cache; done
  done

The first flags are the test suite's light optimisation (tests/paths.py `FAST_COMPILE`). The run is
`ml_ecs.run.trainer.train` on --config (configs/tiny.py by default) in a fresh temporary workdir, with
--backbone_cache as its shared backbone folder.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root

import jax
from absl import app, flags
from jax import monitoring
from ml_collections import config_flags

from ml_ecs.run import trainer
from ml_ecs.run.compilation_cache import enable_compilation_cache

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'the federation')
_CACHE = flags.DEFINE_string('cache', None, 'JAX compilation cache folder (empty it for a cold run)', required=True)
_BACKBONES = flags.DEFINE_string('backbone_cache', os.path.join(tempfile.gettempdir(), 'ml_ecs_compile_time_backbones'),
                                 'pretrained backbones, kept between runs so that only compiling differs')

# JAX's monitoring events, by the name the line gives them.
EVENTS = {'trace_s': '/jax/core/compile/jaxpr_trace_duration',
          'lower_s': '/jax/core/compile/jaxpr_to_mlir_module_duration',
          'xla_compile_s': '/jax/core/compile/backend_compile_duration',
          'cache_saved_s': '/jax/compilation_cache/compile_time_saved_sec'}


def main(argv):
  del argv
  totals, counts = collections.Counter(), collections.Counter()

  def listen(event, duration, **kwargs):
    totals[event] += duration
    counts[event] += 1

  monitoring.register_event_duration_secs_listener(listen)
  cache_was_empty = not os.path.isdir(_CACHE.value) or not os.listdir(_CACHE.value)
  enable_compilation_cache(_CACHE.value)
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    lines = []
    result = trainer.train(_CONFIG.value, workdir, progress=False, backbone_cache=_BACKBONES.value, log=lines.append)
    run_s = time.perf_counter() - t0
  line = {'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'cache': 'cold' if cache_was_empty else 'warm', 'status': result.status, 'run_s': round(run_s, 2),
          'pretrained': any(l.startswith('pretrained ') for l in lines),
          **{k: round(totals[e], 2) for k, e in EVENTS.items()}, 'programs': counts[EVENTS['xla_compile_s']],
          'jax': jax.__version__}
  print(json.dumps(line))


if __name__ == '__main__':
  app.run(main)
