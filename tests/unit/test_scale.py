"""The main job at scale: the synthetic source, partitions of many clients, sampled evaluation."""
import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ml_ecs.core import federation
from ml_ecs.data import synthetic
from ml_ecs.data.loaders import load_dataset
from ml_ecs.data.partition import partition


def _scale_cfg(n):
  from studies.scale.configs import scale_cpu
  return scale_cpu.get_config(str(n))


def test_synthetic_source_is_deterministic_and_serves_many_clients():
  cfg = _scale_cfg(500).data
  a, b = load_dataset(cfg), load_dataset(cfg)
  recordings = synthetic.recordings_for(500, cfg.public_fraction, cfg.max_public_sequences)
  assert a.num_samples == recordings * cfg.synthetic_windows
  for k in a.modalities:
    np.testing.assert_array_equal(a.modalities[k], b.modalities[k])
    assert a.modalities[k].dtype == np.float32
  np.testing.assert_array_equal(a.labels, b.labels)
  assert len(np.unique(a.sequence_ids)) == recordings
  part = partition(a, cfg)
  assert len(part.clients) == 500 and all(len(c.train_idx) and len(c.test_idx) for c in part.clients)
  # The public split is capped (data.max_public_sequences): the same size for 40 and 500 clients.
  public_seqs = lambda p, ds: len(np.unique(ds.sequence_ids[np.concatenate(
      [p.public_train_idx, p.public_test_idx, p.public_holdout_idx, p.public_val_idx])]))   # every public recording
  small_cfg = _scale_cfg(40).data
  small_ds = load_dataset(small_cfg)
  assert public_seqs(part, a) == public_seqs(partition(small_ds, small_cfg), small_ds) == cfg.max_public_sequences
  uncapped = copy.deepcopy(cfg)
  uncapped.max_public_sequences = 0
  assert public_seqs(partition(a, uncapped), a) == round(cfg.public_fraction * recordings) > cfg.max_public_sequences
  # Chunks are drawn from their own streams: a different chunk size is a different (still valid) dataset.
  small = synthetic.generate_chunked(50, 4, seed=3, chunk_sequences=16)
  assert small.num_samples == 200 and np.bincount(small.labels).min() > 0


def test_real_dataset_error_names_its_maximum(dataset):
  from configs import default
  cfg = default.get_config().data
  cfg.num_clients = 128
  with pytest.raises(ValueError, match=r'serves at most 120 clients'):
    partition(dataset, cfg)


@pytest.mark.parametrize('field,value,match', [
    ('data.synthetic_windows', 0, 'data.synthetic_windows'),
    ('data.max_public_sequences', -1, 'data.max_public_sequences'),
    ('eval.clients_per_eval', -1, 'eval.clients_per_eval'),
    ('train.host_state', 1, 'train.host_state'),
    ('eval.final_full', True, 'eval.final_full.*clients_per_eval'),
])


def test_scale_fields_are_clear_errors(tiny_config, field, value, match):
  from ml_ecs.config.validation import ConfigError, validate
  cfg = copy.deepcopy(tiny_config)
  section, name = field.split('.')
  del cfg[section][name]   # re-added: ConfigDict's type safety would refuse an int for a bool field
  cfg[section][name] = value
  with pytest.raises(ConfigError, match=match):
    validate(cfg)


# Measured 0.87 MB per client for tiny (trainables and their Adam moments dominate; data ~0.05-0.1 MB;
# benchmarks/RESULTS.md); the bound leaves ~20% headroom. tests/integration/test_scale.py holds its
# 40-client run at tiny's model sizes to it too (scale_cpu.py's own sizes measured 1.13 MB).
TINY_BYTES_PER_CLIENT = 1.05e6


def _host_cfg(tiny_config):
  cfg = copy.deepcopy(tiny_config)
  cfg.train.update(dict(client_fraction=0.5, host_state=True))
  cfg.eval.clients_per_eval = 2
  return cfg


def test_host_memory_per_idle_client_is_bounded(tiny_config, dataset, tmp_path):
  cfg = _host_cfg(tiny_config)
  setup, state = federation.init(cfg, workdir=str(tmp_path), dataset=dataset, log=lambda s: None)
  per_client = federation.host_bytes_per_client(setup, state)
  assert 0 < per_client < TINY_BYTES_PER_CLIENT


def test_buckets_and_padded_positions():
  assert [federation.bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
  assert federation.bucket(3, 8) == 8 and federation.bucket(9, 8) == 16
  np.testing.assert_array_equal(federation.pad_positions(np.array([4, 7]), 4), [4, 7, 4, 4])


def test_first_row_copies_row_zero_from_host_and_device_trees():
  from ml_ecs.core.client_store import first_row
  from ml_ecs.models import params
  host = {'a': np.arange(12, dtype=np.float32).reshape(3, 4), 'b': np.ones((3, 2, 2), np.int32)}
  for tree in (host, jax.device_put(host)):
    row = first_row(tree)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(row))
    np.testing.assert_array_equal(row['a'], [0, 1, 2, 3])
    assert row['b'].shape == (2, 2) and row['b'].dtype == jnp.int32
  row = first_row(host)
  host['a'][0] = -1.0                          # a new buffer: writing the host row does not reach it
  np.testing.assert_array_equal(row['a'], [0, 1, 2, 3])
  # counting one row's bytes slices nothing: shapes only
  assert params.count(params.row_shapes(host)) == (4 + 4, 4 * 4 + 4 * 4)
