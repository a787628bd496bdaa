"""The embedded default dataset, shipped with the package (no network)."""
from __future__ import annotations

import importlib.resources

import numpy as np

from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.data import synthetic

FILENAME = 'activity_default.npz'


def save(ds: MultimodalDataset, path) -> None:
  """Writes `ds` in the embedded file's format (arrays only; text lives in synthetic.py)."""
  arrays = {f'x_{k}': v for k, v in ds.modalities.items()}
  np.savez_compressed(path, labels=ds.labels, sequence_ids=ds.sequence_ids, text_ids=ds.text_ids, **arrays)


def load_default() -> MultimodalDataset:
  """The shipped activity dataset (3,000 windows, 300 recordings, 6 classes,
  modalities accel [32,3], depth [8], image [8,8]); see ml_ecs/data/synthetic.py."""
  with importlib.resources.files('ml_ecs.data').joinpath(FILENAME).open('rb') as f:
    z = np.load(f)
    modalities = {k[2:]: z[k] for k in z.files if k.startswith('x_')}
    return MultimodalDataset(modalities, z['labels'], z['sequence_ids'], synthetic.CLASS_NAMES,
                             synthetic.DESCRIPTIONS, z['text_ids'])


if __name__ == '__main__':
  # Regenerates the shipped file: python -m ml_ecs.data.embedded
  out = importlib.resources.files('ml_ecs.data').joinpath(FILENAME)
  save(synthetic.generate(), str(out))
  print('wrote', out)
