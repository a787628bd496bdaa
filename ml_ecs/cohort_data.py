"""Device-ready arrays of a cohort: every client's data stacked on a leading axis."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.data.partition import ClientSpec, pad_indices, pad_rows
from ml_ecs.text import TaskText


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SplitArrays:
  """One split of C clients, padded to N samples: inputs[m] [C,N,*shape], mod_mask [C,N,K],
  count [C] (valid samples are the first count[c]), answers/answer_mask [C,N,La], labels [C,N],
  ids [C,N] (dataset index for private splits, public-train position for the public split)."""
  inputs: dict[str, jax.Array]
  mod_mask: jax.Array
  count: jax.Array
  answers: jax.Array
  answer_mask: jax.Array
  labels: jax.Array
  ids: jax.Array


def split_arrays(ds: MultimodalDataset, text: TaskText, modalities: Sequence[str],
                 index_lists: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                 ids: Sequence[np.ndarray] | None = None, max_len: int | None = None) -> SplitArrays:
  """Gathers the samples `index_lists[c]` of each client into padded stacked arrays
  (at most `max_len` per client)."""
  if max_len is not None:
    index_lists = [ix[:max_len] for ix in index_lists]
    masks = [m[:max_len] for m in masks]
    if ids is not None:
      ids = [i[:max_len] for i in ids]
  idx, valid = pad_indices(index_lists)
  return SplitArrays(
      inputs={m: jnp.asarray(ds.modalities[m][idx]) for m in modalities},
      mod_mask=jnp.asarray(pad_rows(list(masks), idx.shape[1])),
      count=jnp.asarray(valid.sum(1).astype(np.int32)),
      answers=jnp.asarray(text.answers[idx]),
      answer_mask=jnp.asarray(text.answer_mask[idx] * valid[..., None]),
      labels=jnp.asarray(ds.labels[idx]),
      ids=jnp.asarray(pad_indices(list(ids if ids is not None else index_lists), idx.shape[1])[0]),
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
                public_train_idx: np.ndarray, max_test: int | None = None) -> CohortData:
  """Stacks the splits of same-structure `clients`."""
  mods = clients[0].modalities
  pos_of = {int(j): p for p, j in enumerate(public_train_idx)}
  return CohortData(
      clients=tuple(clients),
      modalities=mods,
      train=split_arrays(ds, text, mods, [c.train_idx for c in clients], [c.train_mask for c in clients]),
      test=split_arrays(ds, text, mods, [c.test_idx for c in clients], [c.test_mask for c in clients],
                        max_len=max_test),
      public=split_arrays(ds, text, mods, [c.public_idx for c in clients], [c.public_mask for c in clients],
                          ids=[np.array([pos_of[int(j)] for j in c.public_idx], np.int64) for c in clients]),
      val=split_arrays(ds, text, mods, [c.val_idx for c in clients], [c.val_mask for c in clients], max_len=max_test)
      if len(clients[0].val_idx) else None,
  )


def full_modality_split(ds: MultimodalDataset, text: TaskText, idx: np.ndarray,
                        max_len: int | None = None) -> SplitArrays:
  """A single-'client' split with every modality the data has (the server's view of public
  data): the mask is 1 except where the dataset itself misses a sample's modality."""
  idx = idx[:max_len] if max_len is not None else idx
  mods = ds.modality_names
  return split_arrays(ds, text, mods, [idx], [ds.presence(mods)[idx].astype(np.float32)],
                      ids=[np.arange(len(idx))])

