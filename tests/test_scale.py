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


def test_host_state_moves_only_the_sampled_block_and_reuses_the_compiled_round(tiny_config, dataset, tmp_path):
  cfg = copy.deepcopy(tiny_config)
  cfg.train.client_fraction = 0.5
  dev_setup, dev_state = federation.init(cfg, workdir=str(tmp_path), dataset=dataset, log=lambda s: None)
  cfg.train.host_state = True
  setup, state = federation.init(cfg, workdir=str(tmp_path), dataset=dataset, log=lambda s: None)
  assert all(isinstance(x, np.ndarray) for cs in state.cohorts for x in jax.tree.leaves(cs))
  seen = []

  def spy(c):
    def fn(tr, opt, train, public, sel, *a, **kw):
      seen.append((c.num_selected, {x.shape[0] for x in jax.tree.leaves((tr, opt, train, public))}, type(tr)))
      return c.round_fn(tr, opt, train, public, sel, *a, **kw)
    return fn
  import dataclasses
  setup = dataclasses.replace(setup, cohorts=tuple(dataclasses.replace(c, round_fn=spy(c)) for c in setup.cohorts))
  for _ in range(3):   # rounds sample different clients
    state, m = federation.run_round(setup, state)
    dev_state, dm = federation.run_round(dev_setup, dev_state)
    for k in ('client/private_lm', 'client/public_lm', 'server/lm', 'comm/bytes_up'):
      np.testing.assert_allclose(m[k], dm[k], rtol=1e-5, err_msg=k)
  # Every array handed to the jitted round has the sampled block's leading size, never the cohort's.
  assert len(seen) == 3 * len(setup.cohorts) and all(sizes == {n} for n, sizes, _ in seen)
  assert any(n < len(c.client_ids) for n, c in zip([c.num_selected for c in setup.cohorts], setup.cohorts))
  # One compilation per cohort for all rounds, whatever clients were sampled.
  for c in setup.cohorts:
    jitted = [cell.cell_contents for cell in c.round_fn.__closure__
              if hasattr(cell.cell_contents, 'round_fn')][0].round_fn
    assert jitted._cache_size() == 1
  np.testing.assert_allclose(np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.cohorts)]),
                             np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(dev_state.cohorts)]),
                             rtol=1e-4, atol=1e-6)
  out = federation.evaluate(setup, state)
  assert np.isfinite(out['client/rougeLsum_mean'])
