"""The dataset a config names: `data.name` -> a `MultimodalDataset`."""
from __future__ import annotations

import ml_collections

from ml_ecs.data.dataset import MultimodalDataset

DATA_SOURCES = ('embedded', 'urfall')


def load_dataset(cfg: ml_collections.ConfigDict) -> MultimodalDataset:
  """The dataset named by `data.name` (cfg is the `data` config): 'embedded' (shipped) or
  'urfall' (files under data.path)."""
  if cfg.name == 'embedded':
    from ml_ecs.data.embedded import load_default
    return load_default()
  if cfg.name == 'urfall':
    from ml_ecs.data.urfall import load_urfall
    return load_urfall(cfg.path)
  raise ValueError(f'data.name must be one of {DATA_SOURCES}, got {cfg.name!r}')
