"""The main job at scale end to end: studies/scale/configs/scale_cpu.py with 40 clients, sampled evaluation."""
import json
import os
import subprocess
import sys

import pytest

from tests.paths import ROOT, cached_env
from tests.unit.test_scale import TINY_BYTES_PER_CLIENT


# configs/tiny.py's model sizes: what this test checks (sampling, sampled evaluation, host state,
# checkpoints at 40 clients) does not depend on them, and they compile several times faster.
TINY_MODELS = [f'--config.{node}_model.{field}={value}' for node, fields in (
    ('edge', dict(encoder_width=16, **{'backbone.width': 32, 'backbone.layers': 1, 'backbone.heads': 2})),
    ('server', dict(encoder_width=16, **{'backbone.width': 48, 'backbone.layers': 2, 'backbone.heads': 2})))
    for field, value in fields.items()]


@pytest.mark.slow
def test_scale_cpu_config_end_to_end(tmp_path):
  out = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(ROOT, 'launch', 'train.py'),
         '--config=' + os.path.join(ROOT, 'studies', 'scale', 'configs', 'scale_cpu.py') + ':40', f'--workdir={out}',
         '--config.train.rounds=2', '--config.train.eval_every=1', '--config.pretrain.steps=20',
         '--config.eval.clients_per_eval=6', '--config.eval.final_full=True',
         '--config.train.public_steps=1', '--config.train.private_steps=1', '--config.train.server_steps=1',
         *TINY_MODELS, '--noprogress']
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=cached_env())
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [json.loads(l) for l in open(out / 'metrics.jsonl')]
  assert [r['round'] for r in rows] == [0, 1, 2]
  assert rows[1]['clients/sampled'] == 10   # 25% of 40
  # Sampled evaluations report how many clients they cover; the last one (final_full) covers all.
  assert 3 <= rows[1]['client/evaluated'] <= 8 and len(rows[1]['client/rougeLsum']) == rows[1]['client/evaluated']
  assert rows[2]['client/evaluated'] == 40
  assert '(40 clients)' in res.stdout + res.stderr
  summary = json.load(open(out / 'model_summary.json'))
  assert 0 < summary["host_bytes_per_client"] < TINY_BYTES_PER_CLIENT   # tiny's model sizes, tiny's bound
  assert os.path.isdir(out / 'checkpoints' / '2')
