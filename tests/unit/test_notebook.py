"""colab/quickstart.ipynb is what colab/make_notebook.py writes (its run is in tests/integration/test_notebook.py)."""
import os

import pytest

from tests.paths import ROOT

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
