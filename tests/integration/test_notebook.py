"""colab/quickstart.ipynb runs top to bottom (one round)."""
import os

import pytest

from tests.paths import JAX_CACHE, ROOT
from tests.unit.test_notebook import NOTEBOOK


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('ML_ECS_NOTEBOOK_ROUNDS', '1')
  monkeypatch.setenv('ML_ECS_NOTEBOOK_WORKDIR', str(tmp_path / 'run'))
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', JAX_CACHE)
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                          resources={'metadata': {'path': os.path.join(ROOT, 'colab')}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 5, 'the heatmap, curves (x2), client bars, communication and losses plots'
  text = ''.join(o.get('text', '') + str(o.get('data', {}).get('text/plain', '')) for o in outputs)
  assert 'round 1: client LM' in text and 'generated' in text
