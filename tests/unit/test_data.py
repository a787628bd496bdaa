"""Embedded dataset, latent-model complementarity, and client partitioning."""
import copy

import numpy as np
import pytest

from ml_ecs.data import synthetic
from ml_ecs.data.embedded import load_default
from ml_ecs.data.partition import pad_indices, partition
from studies.compare.headroom import modality_features, probe_accuracy


def test_embedded_dataset_shape_and_regeneration(dataset):
  assert dataset.num_samples >= 2000 and dataset.num_classes >= 3
  shapes = {k: v.shape[1:] for k, v in dataset.modalities.items()}
  assert shapes == {'accel': (32, 3), 'depth': (8,), 'image': (8, 8)}
  assert all(len(d) >= 3 for d in dataset.descriptions)
  regen = synthetic.generate()
  for k in dataset.modalities:
    np.testing.assert_allclose(dataset.modalities[k], regen.modalities[k], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(dataset.labels, regen.labels)
  assert len(set(dataset.texts())) == sum(len(d) for d in dataset.descriptions)


def test_modalities_are_complementary(dataset):
  test = dataset.sequence_ids % 5 == 0
  feats = {k: modality_features(v) for k, v in dataset.modalities.items()}
  acc = {k: probe_accuracy(f[~test], dataset.labels[~test], f[test], dataset.labels[test], 6)
         for k, f in feats.items()}
  all_f = np.concatenate(list(feats.values()), 1)
  acc_all = probe_accuracy(all_f[~test], dataset.labels[~test], all_f[test], dataset.labels[test], 6)
  print({**{k: round(v, 3) for k, v in acc.items()}, 'all': round(acc_all, 3)})  # quoted in docs/own_data.md (-s)
  assert acc_all > max(acc.values()) + 0.15, (acc_all, acc)
  assert all(a > 1 / 6 + 0.1 for a in acc.values()), acc  # each modality is informative


def test_partition_deterministic(dataset, tiny_config):
  cfg = copy.deepcopy(tiny_config.data)
  cfg.num_clients = 6
  cfg.modality_sets = ()
  a, b = partition(dataset, cfg), partition(dataset, cfg)
  for ca, cb in zip(a.clients, b.clients):
    assert ca.modalities == cb.modalities and ca.encoder_types == cb.encoder_types
    for f in ('train_idx', 'test_idx', 'public_idx', 'train_mask'):
      np.testing.assert_array_equal(getattr(ca, f), getattr(cb, f))
  cfg.seed = 1
  c = partition(dataset, cfg)
  assert any(not np.array_equal(x.train_idx, y.train_idx) for x, y in zip(a.clients, c.clients))


def test_partition_no_leakage_and_disjoint(dataset, tiny_config):
  cfg = copy.deepcopy(tiny_config.data)
  cfg.num_clients = 10
  cfg.modality_sets = ()
  p = partition(dataset, cfg)
  seq = dataset.sequence_ids
  public = set(seq[p.public_train_idx]) | set(seq[p.public_test_idx])
  assert not set(seq[p.public_train_idx]) & set(seq[p.public_test_idx])
  owned = []
  for c in p.clients:
    assert len(c.train_idx) and len(c.test_idx)
    assert not set(seq[c.train_idx]) & set(seq[c.test_idx])      # no recording on both sides
    assert not (set(seq[c.train_idx]) | set(seq[c.test_idx])) & public
    assert set(c.public_idx) <= set(p.public_train_idx)
    owned.append(np.concatenate([c.train_idx, c.test_idx]))
  owned = np.concatenate(owned)
  assert len(owned) == len(np.unique(owned))                      # clients are disjoint


@pytest.mark.parametrize('rate', [0.3, 0.6])
def test_partition_missing_rates(dataset, tiny_config, rate):
  cfg = copy.deepcopy(tiny_config.data)
  cfg.update(dict(num_clients=60, modality_sets=(), num_device_types=0, modality_missing_rate=rate,
                  sample_missing_rate=rate, dirichlet_alpha=100.0, public_per_client=16))
  p = partition(dataset, cfg)
  n_mod = np.array([len(c.modalities) for c in p.clients])
  # Each modality dropped w.p. rate, with at least one kept: E[kept] over 3 modalities.
  q = 1 - rate
  expected = (3 * q) / (1 - rate ** 3)
  assert abs(n_mod.mean() - expected) < 0.35, (n_mod.mean(), expected)
  masks = np.concatenate([c.train_mask.ravel() for c in p.clients if len(c.modalities) == 3])
  # Among 3-modality clients: each entry missing w.p. rate, all-missing rows get one modality back.
  expected_present = (1 - rate) + rate ** 3 / 3
  assert abs(masks.mean() - expected_present) < 0.03, (masks.mean(), expected_present)
  for c in p.clients:
    assert (c.train_mask.sum(1) >= 1).all() and c.train_mask.shape[1] == len(c.modalities)


def test_partition_explicit_sets_and_cohorts(dataset, tiny_config):
  p = partition(dataset, tiny_config.data)
  assert [c.modalities for c in p.clients] == [('accel', 'depth', 'image')] * 2 + [('depth',)]
  cohorts = p.cohorts()
  assert [len(c) for c in cohorts] == [2, 1]
  idx, mask = pad_indices([c.train_idx for c in cohorts[0]])
  assert idx.shape == mask.shape and mask.sum() == sum(len(c.train_idx) for c in cohorts[0])


def test_partition_label_skew(dataset, tiny_config):
  cfg = copy.deepcopy(tiny_config.data)
  cfg.update(dict(num_clients=5, modality_sets=()))
  hist = lambda p: np.array([np.bincount(dataset.labels[c.train_idx], minlength=6) / len(c.train_idx)
                             for c in p.clients])
  cfg.dirichlet_alpha = 0.1
  skewed = hist(partition(dataset, cfg)).max(1).mean()
  cfg.dirichlet_alpha = 100.0
  even = hist(partition(dataset, cfg)).max(1).mean()
  assert skewed > even + 0.2


def test_partition_bad_config(dataset, tiny_config):
  cfg = copy.deepcopy(tiny_config.data)
  cfg.modality_sets = (('accel', 'sonar'),) * 3
  with pytest.raises(ValueError, match='modality_sets'):
    partition(dataset, cfg)
  cfg.modality_sets = ()
  cfg.sample_missing_rate = 1.5
  with pytest.raises(ValueError, match='sample_missing_rate'):
    partition(dataset, cfg)


def test_device_types_form_cohorts(dataset, tiny_config):
  cfg = copy.deepcopy(tiny_config.data)
  cfg.update(dict(num_clients=7, modality_sets=(), num_device_types=3))
  cfg.encoders.accel = ('conv1d', 'transformer', 'mlp')
  p = partition(dataset, cfg)
  for c in p.clients:
    same = p.clients[c.client_id % 3]
    assert c.cohort_key == same.cohort_key
  assert len(p.cohorts()) <= 3 and sum(len(c) for c in p.cohorts()) == 7


def test_validation_split_is_cut_from_training_sequences_only(dataset, tiny_config):
  import copy
  from ml_ecs.data.partition import partition
  cfg = copy.deepcopy(tiny_config)
  assert all(len(c.val_idx) == 0 for c in partition(dataset, cfg.data).clients)
  cfg.data.client_val_fraction = 0.25
  p = partition(dataset, cfg.data)
  seq = dataset.sequence_ids
  for c in p.clients:
    assert len(c.val_idx) and len(c.train_idx) and c.val_mask.shape == (len(c.val_idx), len(c.modalities))
    for other in (c.train_idx, c.test_idx):
      assert not set(seq[c.val_idx]) & set(seq[other])      # whole recordings, never shared
    assert set(c.public_idx) <= set(p.public_train_idx)
  assert len(p.public_val_idx) and not set(seq[p.public_val_idx]) & set(seq[p.public_train_idx])
  assert not set(p.public_val_idx) & set(p.public_test_idx)


def test_modality_seed_fixes_modality_sets_across_partition_seeds(dataset, tiny_config):
  import copy
  from ml_ecs.data.partition import partition
  cfg = copy.deepcopy(tiny_config)
  cfg.data.update(dict(modality_sets=(), num_clients=6, num_device_types=3, modality_missing_rate=0.5))
  sets = lambda seed, mseed: [c.modalities for c in partition(dataset, dict_cfg(cfg, seed, mseed)).clients]

  def dict_cfg(c, seed, mseed):
    out = copy.deepcopy(c.data)
    out.seed, out.modality_seed = seed, mseed
    return out

  assert sets(0, 5) == sets(1, 5) == sets(2, 5)
  assert len({tuple(sets(s, -1)) for s in range(6)}) > 1       # -1: drawn with the partition, as before
