"""The in-memory multimodal dataset every loader returns."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MultimodalDataset:
  """Aligned samples with several modalities, a class label and a text target.

  Attributes:
    modalities: name -> float32 array [N, *shape] (shape may differ per modality).
    labels: int32 [N] class ids in [0, num_classes).
    sequence_ids: int64 [N]; samples of one recording share an id, so splits
      by sequence never put windows of one recording on both sides.
    class_names: one short name per class.
    descriptions: per class, several paraphrases of its text description.
    text_ids: int32 [N]; which paraphrase of its class is sample i's target.
    present: optional modality -> bool [N]; False marks a sample whose modality is
      missing in the data itself (its values are meaningless; loaders store 0).
      None (the default) means every modality of every sample is present. Partitioning
      never shows a missing sample's modality to a node (ml_ecs/data/partition.py).
  """

  modalities: dict[str, np.ndarray]
  labels: np.ndarray
  sequence_ids: np.ndarray
  class_names: tuple[str, ...]
  descriptions: tuple[tuple[str, ...], ...]
  text_ids: np.ndarray
  present: dict[str, np.ndarray] | None = None

  def __post_init__(self):
    n = len(self.labels)
    if not self.modalities:
      raise ValueError('MultimodalDataset.modalities is empty: expected at least one modality')
    for name, x in self.modalities.items():
      if x.shape[0] != n:
        raise ValueError(f'modality {name!r} has {x.shape[0]} samples, labels have {n}')
    for field in ('sequence_ids', 'text_ids'):
      if getattr(self, field).shape != (n,):
        raise ValueError(f'{field} has shape {getattr(self, field).shape}, expected ({n},)')
    if len(self.descriptions) != len(self.class_names):
      raise ValueError('descriptions must have one tuple of paraphrases per class')
    if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
      raise ValueError(f'labels must lie in [0, {len(self.class_names)})')
    if self.present is not None:
      self._check_present(n)

  def _check_present(self, n: int) -> None:
    unknown = set(self.present) - set(self.modalities)
    if unknown:
      raise ValueError(f'present has modalities {sorted(unknown)} that are not in modalities '
                       f'{list(self.modalities)}')
    for name, p in self.present.items():
      if p.dtype != np.bool_ or p.shape != (n,):
        raise ValueError(f'present[{name!r}] has dtype {p.dtype} and shape {p.shape}, '
                         f'expected bool ({n},)')
    none = np.flatnonzero(~self.presence(self.modality_names).any(1))
    if none.size:
      raise ValueError(f'{none.size} samples have no modality present (first: sample {none[0]}); '
                       'every sample needs at least one')

  @property
  def num_samples(self) -> int:
    return int(len(self.labels))

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def modality_names(self) -> tuple[str, ...]:
    return tuple(self.modalities)

  @property
  def all_present(self) -> bool:
    """True when no sample misses any modality."""
    return self.present is None or all(bool(p.all()) for p in self.present.values())

  def presence(self, modalities: tuple[str, ...] | list[str]) -> np.ndarray:
    """bool [N, K]: whether sample i has modality `modalities[k]` in the data."""
    cols = [self.present[m] if self.present is not None and m in self.present
            else np.ones(self.num_samples, bool) for m in modalities]
    return np.stack(cols, 1) if cols else np.ones((self.num_samples, 0), bool)

  def texts(self) -> list[str]:
    """The reference text of every sample."""
    return [self.descriptions[c][t] for c, t in zip(self.labels, self.text_ids)]
