"""Split a dataset into a public split and N heterogeneous edge clients.

Each client gets a modality set (explicit, or drawn with a modality-missing
rate, per client or per device type), an encoder architecture per modality, label-skewed private data
(Dirichlet(alpha) over classes), a train/test split by sequence (no recording on
both sides), per-sample missing-modality masks, and a subset of the public
split. Samples whose modality is missing in the data itself (`MultimodalDataset.present`)
are always masked as missing, and a client never gets a sample with none of its
modalities present. Clients with the same modality set and encoders form a cohort, whose
arrays are stacked on a leading client axis for `jax.vmap`.
Everything is a deterministic function of the config and the seed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from ml_ecs.data.dataset import MultimodalDataset


@dataclasses.dataclass(frozen=True)
class ClientSpec:
  """One edge client: its structure and the indices of its samples in the dataset.

  Masks are [n, K] over the client's own modalities (in dataset order), 1 = present.
  """
  client_id: int
  modalities: tuple[str, ...]
  encoder_types: tuple[tuple[str, str], ...]   # ((modality, encoder type), ...)
  train_idx: np.ndarray
  test_idx: np.ndarray
  public_idx: np.ndarray
  train_mask: np.ndarray
  test_mask: np.ndarray
  public_mask: np.ndarray
  # Validation split cut from the client's training sequences (data.client_val_fraction > 0).
  val_idx: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int64))
  val_mask: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))

  @property
  def cohort_key(self) -> tuple:
    return self.modalities, self.encoder_types


@dataclasses.dataclass(frozen=True)
class Partition:
  """Clients plus the public split (train part for SE-CCL and the server, test part for the server)."""
  clients: tuple[ClientSpec, ...]
  public_train_idx: np.ndarray
  public_test_idx: np.ndarray
  public_val_idx: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int64))
  # held out of the public training split, never trained on: SE-CCL's reliability split (data.public_holdout_fraction)
  public_holdout_idx: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int64))

  def cohorts(self) -> list[list[ClientSpec]]:
    """Clients grouped by (modality set, encoder types), in order of first appearance."""
    groups: dict[tuple, list[ClientSpec]] = {}
    for c in self.clients:
      groups.setdefault(c.cohort_key, []).append(c)
    return list(groups.values())


def _split_by_sequence(rng, idx, seq_ids, test_fraction, max_test: int = 0):
  seqs = np.unique(seq_ids[idx])
  rng.shuffle(seqs)
  n_test = int(round(test_fraction * len(seqs)))
  if len(seqs) >= 2:
    n_test = min(max(n_test, 1), len(seqs) - 1)
  if max_test:
    n_test = min(n_test, max_test)
  test_seqs = seqs[:n_test]
  is_test = np.isin(seq_ids[idx], test_seqs)
  return idx[~is_test], idx[is_test]


TEST_ORDERS = ('recordings', 'interleaved')


def _interleave(rng, idx: np.ndarray, seq_ids: np.ndarray) -> np.ndarray:
  """`idx` reordered round-robin over its recordings (in a drawn order): the first window of each
  recording, then the second of each, ... so that any prefix (the evaluation's cap,
  eval.max_test_per_client / eval.max_server_test) spreads over as many recordings as it can."""
  if not len(idx):
    return idx
  seqs = np.unique(seq_ids[idx])
  rank = np.empty(len(seqs), np.int64)
  rank[rng.permutation(len(seqs))] = np.arange(len(seqs))
  seq_rank = rank[np.searchsorted(seqs, seq_ids[idx])]
  order = np.argsort(seq_rank, kind='stable')           # grouped by recording, windows in dataset order
  within = np.empty(len(idx), np.int64)                 # position of each window inside its recording
  starts = np.flatnonzero(np.r_[True, np.diff(seq_rank[order]) != 0])
  within[order] = np.arange(len(idx)) - np.repeat(starts, np.diff(np.r_[starts, len(idx)]))
  return idx[np.lexsort((seq_rank, within))]


def _dirichlet_by_sequence(rng, seq_label, num_clients, num_classes, alpha):
  """Assigns whole sequences to clients with per-class Dirichlet(alpha) proportions."""
  owner = np.empty(len(seq_label), np.int64)
  for c in range(num_classes):
    seqs = np.flatnonzero(seq_label == c)
    rng.shuffle(seqs)
    props = rng.dirichlet(np.full(num_clients, alpha))
    cuts = (np.cumsum(props)[:-1] * len(seqs)).astype(int)
    for k, part in enumerate(np.split(seqs, cuts)):
      owner[part] = k
  # Every client needs at least two sequences (one train, one test): take from the richest.
  counts = np.bincount(owner, minlength=num_clients)   # kept up to date: O(1) per client, not O(sequences)
  for k in range(num_clients):
    while counts[k] < 2:
      donor = counts.argmax()
      owner[rng.choice(np.flatnonzero(owner == donor))] = k
      counts[donor] -= 1
      counts[k] += 1
  return owner


def _sample_masks(rng, n, k, rate):
  """[n, k] presence masks: each entry missing with prob `rate`, at least one present per row."""
  mask = (rng.random((n, k)) >= rate).astype(np.float32)
  empty = mask.sum(1) == 0
  mask[empty, rng.integers(0, k, empty.sum())] = 1.0
  return mask


def _available_masks(rng, ds: MultimodalDataset, idx: np.ndarray, mods: tuple[str, ...],
                     rate: float) -> tuple[np.ndarray, np.ndarray]:
  """(idx, [n, K] masks) honouring the dataset's own missing samples (`ds.present`).

  Samples with none of `mods` present are dropped (the node could not observe them).
  The drawn per-sample masks are multiplied by the availability; a row left empty gets
  one available modality back, drawn uniformly, so every kept sample has an input.
  """
  avail = ds.presence(mods)[idx]
  keep = avail.any(1)
  idx, avail = idx[keep], avail[keep]
  mask = _sample_masks(rng, len(idx), len(mods), rate) * avail
  for r in np.flatnonzero(mask.sum(1) == 0):
    mask[r, rng.choice(np.flatnonzero(avail[r]))] = 1.0
  return idx, mask


def _draw_modality_set(rng, rate, all_modalities):
  keep = rng.random(len(all_modalities)) >= rate
  if not keep.any():
    keep[rng.integers(len(all_modalities))] = True
  return tuple(m for m, k in zip(all_modalities, keep) if k)


def _profiles(rng, cfg, all_modalities):
  """Per client: (modality set, profile index used to pick its encoders).

  Explicit `modality_sets` fix each client's set. Otherwise, with
  `num_device_types` = K > 0, K device types are drawn and client c is of type
  c mod K (same-type clients share structure and form one cohort); with K = 0
  every client draws its own set.
  """
  if cfg.get('modality_sets'):
    sets = [tuple(s) for s in cfg.modality_sets]
    if len(sets) != cfg.num_clients:
      raise ValueError(f'data.modality_sets has {len(sets)} entries, expected num_clients={cfg.num_clients}')
    for s in sets:
      unknown = set(s) - set(all_modalities)
      if unknown or not s:
        raise ValueError(f'data.modality_sets entry {s} must be a non-empty subset of {all_modalities}')
    return [(tuple(m for m in all_modalities if m in s), k) for k, s in enumerate(sets)]
  types = cfg.get('num_device_types', 0)
  if types < 0:
    raise ValueError(f'data.num_device_types must be >= 0, got {types}')
  if types:
    drawn = [_draw_modality_set(rng, cfg.modality_missing_rate, all_modalities) for _ in range(types)]
    return [(drawn[k % types], k % types) for k in range(cfg.num_clients)]
  return [(_draw_modality_set(rng, cfg.modality_missing_rate, all_modalities), k) for k in range(cfg.num_clients)]


def partition(ds: MultimodalDataset, cfg: ml_collections.ConfigDict) -> Partition:
  """Partitions `ds` per the data config (see configs/default.py, field `data`)."""
  if cfg.num_clients < 1:
    raise ValueError(f'data.num_clients must be >= 1, got {cfg.num_clients}')
  if not 0.0 < cfg.dirichlet_alpha:
    raise ValueError(f'data.dirichlet_alpha must be > 0, got {cfg.dirichlet_alpha}')
  for field in ('modality_missing_rate', 'sample_missing_rate', 'public_fraction', 'client_test_fraction'):
    if not 0.0 <= cfg[field] < 1.0:
      raise ValueError(f'data.{field} must be in [0, 1), got {cfg[field]}')
  rng = np.random.default_rng(cfg.seed)
  all_mods = ds.modality_names
  missing = [m for m in all_mods if m not in cfg.encoders or not cfg.encoders[m]]
  if missing:
    raise ValueError(f'data.encoders has no encoder types for modalities {missing} of the dataset '
                     f'(dataset modalities: {all_mods})')
  all_idx = np.arange(ds.num_samples)
  # data.max_public_sequences caps the public split (the cloud's dataset does not grow with the
  # federation: the server encodes all of it every round); the rest stays private.
  private_idx, public_idx = _split_by_sequence(rng, all_idx, ds.sequence_ids, cfg.public_fraction,
                                               cfg.get('max_public_sequences', 0))
  pub_train, pub_test = _split_by_sequence(rng, public_idx, ds.sequence_ids, cfg.public_test_fraction)
  # data.test_order='interleaved': test splits ordered round-robin over their recordings (own stream),
  # so the evaluation's cap takes windows of every recording instead of the first few recordings.
  test_order = cfg.get('test_order', 'recordings')
  if test_order not in TEST_ORDERS:
    raise ValueError(f'data.test_order={test_order!r}: expected one of {TEST_ORDERS}')
  order_rng = np.random.default_rng([cfg.seed, 107])
  if test_order == 'interleaved':
    pub_test = _interleave(order_rng, pub_test, ds.sequence_ids)
  # SE-CCL's reliability split: public sequences no node trains on, where the server and every client measure
  # their LM loss on the same samples (ml_ecs.algorithms.ml_ecs.se_ccl); its own stream, cut only when asked for.
  pub_holdout = np.zeros((0,), np.int64)
  if cfg.get('public_holdout_fraction', 0.0):
    pub_train, pub_holdout = _split_by_sequence(np.random.default_rng([cfg.seed, 103]), pub_train,
                                                ds.sequence_ids, cfg.public_holdout_fraction)
  val_fraction = cfg.get('client_val_fraction', 0.0)
  # Validation splits (for tuning) come from their own stream, so that they are cut only when asked for.
  val_rng = np.random.default_rng([cfg.seed, 101])
  pub_val = np.zeros((0,), np.int64)
  if val_fraction:
    pub_train, pub_val = _split_by_sequence(val_rng, pub_train, ds.sequence_ids, val_fraction)

  seqs, first = np.unique(ds.sequence_ids[private_idx], return_index=True)
  seq_label = ds.labels[private_idx][first]
  if len(seqs) < 2 * cfg.num_clients:
    raise ValueError(f'{len(seqs)} private sequences cannot give {cfg.num_clients} clients two sequences each: '
                     f'this dataset serves at most {len(seqs) // 2} clients (data.name=\'synthetic\' draws '
                     'the embedded data\'s latent model at any size)')
  owner = _dirichlet_by_sequence(rng, seq_label, cfg.num_clients, ds.num_classes, cfg.dirichlet_alpha)
  modality_seed = cfg.get('modality_seed', -1)
  # modality_seed >= 0 fixes the modality sets apart from the partition seed (grids: one set of
  # device types per missing rate, whatever the partition seed).
  profiles = _profiles(rng if modality_seed < 0 else np.random.default_rng([modality_seed, 7]), cfg, all_mods)
  # Each client's private samples in private_idx order (one stable sort, not a scan per client).
  sample_owner = owner[np.searchsorted(seqs, ds.sequence_ids[private_idx])]
  order = np.argsort(sample_owner, kind='stable')
  by_client = np.split(private_idx[order], np.cumsum(np.bincount(sample_owner, minlength=cfg.num_clients))[:-1])
  clients = []
  for k in range(cfg.num_clients):
    idx = by_client[k]
    train, test = _split_by_sequence(rng, idx, ds.sequence_ids, cfg.client_test_fraction)
    if test_order == 'interleaved':
      test = _interleave(order_rng, test, ds.sequence_ids)
    val = None
    if val_fraction:
      train, val = _split_by_sequence(val_rng, train, ds.sequence_ids, val_fraction)
    n_pub = min(cfg.public_per_client, len(pub_train))
    pub = np.sort(rng.choice(pub_train, n_pub, replace=False))
    mods, profile = profiles[k]
    enc = tuple((m, cfg.encoders[m][profile % len(cfg.encoders[m])]) for m in mods)
    if ds.all_present:
      masks = [_sample_masks(rng, len(x), len(mods), cfg.sample_missing_rate) for x in (train, test, pub)]
    else:
      (train, test, pub), masks = zip(*[_available_masks(rng, ds, x, mods, cfg.sample_missing_rate)
                                        for x in (train, test, pub)])
      for split, ix in (('train', train), ('test', test)):
        if not len(ix):
          raise ValueError(f'client {k} (modalities {mods}) has no {split} sample with any of its '
                           'modalities present in the dataset')
    extra = {}
    if val is not None:
      if ds.all_present:
        val_mask = _sample_masks(val_rng, len(val), len(mods), cfg.sample_missing_rate)
      else:
        val, val_mask = _available_masks(val_rng, ds, val, mods, cfg.sample_missing_rate)
      if not len(val) or not len(train):
        raise ValueError(f'client {k} has too few sequences for data.client_val_fraction={val_fraction}: '
                         f'{len(train)} train / {len(val)} validation samples')
      extra = dict(val_idx=val, val_mask=val_mask)
    clients.append(ClientSpec(k, mods, enc, train, test, pub, *masks, **extra))
  return Partition(tuple(clients), pub_train, pub_test, pub_val, pub_holdout)


def pad_indices(index_lists: Sequence[np.ndarray], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Stacks ragged index lists into ([C, L] indices padded with 0, [C, L] float sample mask)."""
  length = length or max(max(len(i) for i in index_lists), 1)
  idx = np.zeros((len(index_lists), length), np.int64)
  mask = np.zeros((len(index_lists), length), np.float32)
  for c, ix in enumerate(index_lists):
    idx[c, :len(ix)] = ix
    mask[c, :len(ix)] = 1.0
  return idx, mask


def pad_rows(arrays: Sequence[np.ndarray], length: int | None = None) -> np.ndarray:
  """Stacks ragged [n_c, ...] arrays into [C, L, ...] padded with zeros."""
  length = length or max(max(len(a) for a in arrays), 1)
  out = np.zeros((len(arrays), length) + arrays[0].shape[1:], arrays[0].dtype)
  for c, a in enumerate(arrays):
    out[c, :len(a)] = a
  return out
