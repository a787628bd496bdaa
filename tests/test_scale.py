"""The main job at scale: the synthetic source, partitions of many clients, sampled evaluation."""
import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ml_ecs import federation
from ml_ecs.data import synthetic
from ml_ecs.data.loaders import load_dataset
from ml_ecs.data.partition import partition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scale_cfg(n):
  from configs import scale_cpu
  return scale_cpu.get_config(str(n))


def test_synthetic_source_is_deterministic_and_serves_many_clients():
  cfg = _scale_cfg(500).data
  a, b = load_dataset(cfg), load_dataset(cfg)
  assert a.num_samples == synthetic.recordings_for(500, cfg.public_fraction) * cfg.synthetic_windows
  for k in a.modalities:
    np.testing.assert_array_equal(a.modalities[k], b.modalities[k])
    assert a.modalities[k].dtype == np.float32
  np.testing.assert_array_equal(a.labels, b.labels)
  assert len(np.unique(a.sequence_ids)) == synthetic.recordings_for(500, cfg.public_fraction)
  part = partition(a, cfg)
  assert len(part.clients) == 500 and all(len(c.train_idx) and len(c.test_idx) for c in part.clients)
  # Chunks are drawn from their own streams: a different chunk size is a different (still valid) dataset.
  small = synthetic.generate_chunked(50, 4, seed=3, chunk_sequences=16)
  assert small.num_samples == 200 and np.bincount(small.labels).min() > 0


def test_real_dataset_error_names_its_maximum(dataset):
  from configs import default
  cfg = default.get_config().data
  cfg.num_clients = 128
  with pytest.raises(ValueError, match=r'serves at most 120 clients'):
    partition(dataset, cfg)


def test_bad_synthetic_fields_are_clear_errors(tiny_config):
  from ml_ecs.validation import ConfigError, validate
  cfg = copy.deepcopy(tiny_config)
  cfg.data.synthetic_windows = 0
  with pytest.raises(ConfigError, match='data.synthetic_windows'):
    validate(cfg)
  cfg = copy.deepcopy(tiny_config)
  cfg.eval.clients_per_eval = -1
  with pytest.raises(ConfigError, match='eval.clients_per_eval'):
    validate(cfg)


def test_evaluation_samples_clients_deterministically_by_round(tiny_config, dataset, tmp_path):
  cfg = copy.deepcopy(tiny_config)
  cfg.eval.clients_per_eval = 1
  setup, state = federation.init(cfg, workdir=str(tmp_path), dataset=dataset, log=lambda s: None)
  pos = federation.eval_positions(setup, 0)
  assert [len(p) for p in pos] == [1] * len(setup.cohorts)
  assert all(np.array_equal(p, q) for p, q in zip(pos, federation.eval_positions(setup, 0)))
  out = federation.evaluate(setup, state)
  assert out['client/evaluated'] == len(out['client/rougeLsum']) == len(setup.cohorts) < 3
  again = federation.evaluate(setup, state)
  assert again['client/rougeLsum'] == out['client/rougeLsum']


@pytest.mark.slow
def test_scale_cpu_config_end_to_end(tmp_path):
  out = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(ROOT, 'launch', 'train.py'),
         '--config=' + os.path.join(ROOT, 'configs', 'scale_cpu.py') + ':40', f'--workdir={out}',
         '--config.train.rounds=1', '--config.pretrain.steps=20', '--config.eval.clients_per_eval=6',
         '--config.train.public_steps=1', '--config.train.private_steps=1', '--config.train.server_steps=1',
         '--noprogress']
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [json.loads(l) for l in open(out / 'metrics.jsonl')]
  assert [r['round'] for r in rows] == [0, 1]
  assert rows[-1]['clients/sampled'] == 10   # 25% of 40
  assert 3 <= rows[-1]['client/evaluated'] <= 8 and len(rows[-1]['client/rougeLsum']) == rows[-1]['client/evaluated']
