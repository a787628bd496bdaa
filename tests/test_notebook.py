"""colab/quickstart.ipynb runs top to bottom (one round), and is what colab/make_notebook.py writes."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'colab', 'quickstart.ipynb')


def test_committed_notebook_is_generated_and_stripped():
  nbformat = pytest.importorskip('nbformat')
  import importlib.util
  spec = importlib.util.spec_from_file_location('make_notebook', os.path.join(ROOT, 'colab', 'make_notebook.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  committed = nbformat.read(NOTEBOOK, as_version=4)
  assert [c.source for c in committed.cells] == [c.source for c in module.build().cells], \
      'colab/quickstart.ipynb is stale: run python colab/make_notebook.py'
  for cell in committed.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, 'outputs must be stripped'


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('ML_ECS_NOTEBOOK_ROUNDS', '1')
  monkeypatch.setenv('ML_ECS_NOTEBOOK_WORKDIR', str(tmp_path / 'run'))
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', os.path.join(ROOT, '.pytest_cache', 'jax_cache'))
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
