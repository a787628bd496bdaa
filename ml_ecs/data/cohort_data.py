"""Device-ready arrays of a cohort: every client's data stacked on a leading axis."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np

from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.data.partition import ClientSpec, pad_indices, pad_rows
from ml_ecs.data.text import TaskText


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SplitArrays:
  """One split of C clients, padded to N samples: inputs[m] [C,N,*shape], mod_mask [C,N,K],
  count [C] (valid samples are the first count[c]), answers/answer_mask [C,N,La], labels [C,N],
  ids [C,N] (dataset index for private splits, public-train position for the public split),
  seq [C,N] sequence (recording) id of each row (-1 padding; None: unknown).
  Unlabelled samples (data.label_fraction, data.public_labels, data.server_label_fraction)
  have an all-zero answer_mask: no LM loss and no text anchor; they still enter CCL/SE-CCL."""
  inputs: dict[str, jax.Array]
  mod_mask: jax.Array
  count: jax.Array
  answers: jax.Array
  answer_mask: jax.Array
  labels: jax.Array
  ids: jax.Array
  seq: jax.Array | None = None


def labelled_rows(n: int, fraction: float, seed: int, owner: int) -> np.ndarray:
  """[n] 0/1: which of an owner's n samples have their label (answer text); exactly
  ceil(fraction * n) of them (at least one when n > 0), drawn from (seed, owner)."""
  out = np.zeros(n, np.float32)
  if n == 0:
    return out
  k = n if fraction >= 1.0 else max(1, int(np.ceil(fraction * n)))
  out[np.random.default_rng([seed, owner + 2]).permutation(n)[:k]] = 1.0
  return out


def split_arrays(ds: MultimodalDataset, text: TaskText, modalities: Sequence[str],
                 index_lists: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                 ids: Sequence[np.ndarray] | None = None, max_len: int | None = None,
                 labelled: Sequence[np.ndarray] | None = None, rows: slice = slice(None),
                 host: bool = False) -> SplitArrays:
  """Gathers the samples `index_lists[c]` of each client into padded stacked arrays
  (at most `max_len` per client); `labelled[c]` (0/1 per sample) zeroes unlabelled answers' masks.
  Only the clients `rows` are built, padded as all of them would be (a process builds its own clients).
  `host`: numpy arrays (in JAX's canonical dtypes) that stay in host memory, not device arrays."""
  canonical = lambda x: np.asarray(x, jax.dtypes.canonicalize_dtype(np.asarray(x).dtype))
  # device arrays by transfer: jnp.asarray would compile a small program per shape
  to = canonical if host else (lambda x: jax.device_put(canonical(x)))
  if max_len is not None:
    if labelled is not None:
      labelled = [lb[:max_len] for lb in labelled]
    index_lists = [ix[:max_len] for ix in index_lists]
    masks = [m[:max_len] for m in masks]
    if ids is not None:
      ids = [i[:max_len] for i in ids]
  length = max(max(len(i) for i in index_lists), 1)
  index_lists, masks = index_lists[rows], masks[rows]
  labelled = labelled[rows] if labelled is not None else None
  ids = ids[rows] if ids is not None else None
  idx, valid = pad_indices(index_lists, length)
  lab = valid.astype(np.float32) if labelled is None else pad_rows([np.asarray(l)[:, None] for l in labelled],
                                                                   idx.shape[1])[..., 0]
  return SplitArrays(
      inputs={m: to(ds.modalities[m][idx]) for m in modalities},
      mod_mask=to(pad_rows(list(masks), idx.shape[1])),
      count=to(valid.sum(1).astype(np.int32)),
      answers=to(text.answers[idx]),
      answer_mask=to(text.answer_mask[idx] * (valid * lab)[..., None]),
      labels=to(ds.labels[idx]),
      ids=to(pad_indices(list(ids if ids is not None else index_lists), idx.shape[1])[0]),
      seq=to(np.where(valid, ds.sequence_ids[idx], -1)),
  )


@dataclasses.dataclass(frozen=True)
class CohortData:
  """Train, test and public splits of one cohort's clients (same modality set), and the
  validation split when the partition cut one (data.client_val_fraction > 0)."""
  clients: tuple[ClientSpec, ...]
  modalities: tuple[str, ...]
  train: SplitArrays
  test: SplitArrays
  public: SplitArrays
  val: SplitArrays | None = None

  def eval_split(self, name: str) -> tuple[SplitArrays, list[np.ndarray]]:
    """(stacked split, per-client dataset indices) evaluated as `name` ('test' or 'val')."""
    if name == 'val':
      if self.val is None:
        raise ValueError("eval.split='val' needs data.client_val_fraction > 0")
      return self.val, [c.val_idx for c in self.clients]
    return self.test, [c.test_idx for c in self.clients]


def cohort_data(ds: MultimodalDataset, text: TaskText, clients: Sequence[ClientSpec],
                public_train_idx: np.ndarray, max_test: int | None = None, label_fraction: float = 1.0,
                public_labels: bool = True, label_seed: int = 0, rows: slice = slice(None),
                host: bool = False) -> CohortData:
  """Stacks the splits of same-structure `clients`; `label_fraction` of each client's private
  training samples keep their answer text, public samples keep theirs iff `public_labels`.
  The arrays hold the clients `rows` only (padded as the whole cohort); `clients` names all.
  `host`: the splits stay numpy arrays in host memory (`split_arrays`)."""
  mods = clients[0].modalities
  split = functools.partial(split_arrays, ds, text, mods, rows=rows, host=host)
  pos_of = {int(j): p for p, j in enumerate(public_train_idx)}
  return CohortData(
      clients=tuple(clients),
      modalities=mods,
      train=split([c.train_idx for c in clients], [c.train_mask for c in clients],
                 labelled=[labelled_rows(len(c.train_idx), label_fraction, label_seed, c.client_id)
                           for c in clients]),
      test=split([c.test_idx for c in clients], [c.test_mask for c in clients], max_len=max_test),
      public=split([c.public_idx for c in clients], [c.public_mask for c in clients],
                   ids=[np.array([pos_of[int(j)] for j in c.public_idx], np.int64) for c in clients],
                   labelled=[np.full(len(c.public_idx), float(public_labels), np.float32) for c in clients]),
      val=split([c.val_idx for c in clients], [c.val_mask for c in clients], max_len=max_test)
      if len(clients[0].val_idx) else None,
  )


def holdout_split(ds: MultimodalDataset, text: TaskText, modalities: Sequence[str], idx: np.ndarray,
                  max_len: int | None = None) -> SplitArrays | None:
  """The public hold-out (`Partition.public_holdout_idx`) as one labelled, unstacked split seen through
  `modalities` (a cohort's; the server's: all), keeping the samples with at least one of them present;
  None if there is none. Every node measures its SE-CCL reliability on it (the same samples)."""
  present = ds.presence(modalities)[idx].astype(np.float32)
  keep = present.sum(1) > 0
  idx, present = idx[keep][:max_len], present[keep][:max_len]
  if not len(idx):
    return None
  split = split_arrays(ds, text, modalities, [idx], [present], ids=[np.arange(len(idx))],
                       labelled=[np.ones(len(idx), np.float32)], host=True)
  return jax.device_put(jax.tree.map(lambda x: x[0], split))


def full_modality_split(ds: MultimodalDataset, text: TaskText, idx: np.ndarray,
                        max_len: int | None = None, label_fraction: float = 1.0,
                        label_seed: int = 0, host: bool = False) -> SplitArrays:
  """A single-'client' split with every modality the data has (the server's view of public
  data): the mask is 1 except where the dataset itself misses a sample's modality;
  `label_fraction` of the samples keep their answer text (the server's labels). `host`: numpy arrays
  (as `split_arrays`)."""
  idx = idx[:max_len] if max_len is not None else idx
  mods = ds.modality_names
  return split_arrays(ds, text, mods, [idx], [ds.presence(mods)[idx].astype(np.float32)],
                      ids=[np.arange(len(idx))], labelled=[labelled_rows(len(idx), label_fraction, label_seed, -2)],
                      host=host)

