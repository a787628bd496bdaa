"""benchmarks/compile_time.py runs the main job and reports JAX's own tracing, lowering and compile seconds."""
import json
import os
import subprocess
import sys

import pytest

from tests.paths import JAX_CACHE, ROOT, cached_env


@pytest.mark.slow
def test_compile_time_reports_a_warm_run():
  # The suite's caches: configs/tiny.py's programs and backbones are there once another tiny run has made them;
  # whether they were, the line says.
  env = cached_env()
  res = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'compile_time.py'), f'--cache={JAX_CACHE}',
                        f"--backbone_cache={env['ML_ECS_BACKBONE_CACHE']}", '--config.train.rounds=1'],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  line = json.loads(res.stdout.strip().splitlines()[-1])
  assert line['status'] == 'complete' and line['xla_flags'] == os.environ['XLA_FLAGS'], line
  assert line['cache'] in ('cold', 'warm') and isinstance(line['pretrained'], bool)
  assert line['programs'] > 0 and line['trace_s'] > 0 and line['lower_s'] > 0 and line['xla_compile_s'] > 0, line
