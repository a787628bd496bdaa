"""colab/quickstart.ipynb runs top to bottom at its default rounds (configs/notebook.py) and learns."""
import json
import os

import pytest

from tests.paths import JAX_CACHE, ROOT
from tests.unit.test_notebook import NOTEBOOK

# What "learns" means here (measured margins in configs/notebook.py's docstring): the clients' LM loss
# falls by at least this much from round 1 to the last, and their accuracy beats both constant-answer
# floors by at least this much.
LM_DROP = 0.05
ACCURACY_OVER_FLOORS = 0.15


@pytest.mark.slow
def test_notebook_learns_at_its_default_rounds(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  pytest.importorskip('pandas')
  workdir = tmp_path / 'run'
  monkeypatch.delenv('ML_ECS_NOTEBOOK_ROUNDS', raising=False)
  monkeypatch.setenv('ML_ECS_NOTEBOOK_WORKDIR', str(workdir))
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', JAX_CACHE)
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=1200, kernel_name='python3',
                          resources={'metadata': {'path': os.path.join(ROOT, 'colab')}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 5, 'the heatmap, curves (x2), client bars, communication and losses plots'
  html = ''.join(str(o.get('data', {}).get('text/html', '')) for o in outputs)
  assert '<table' in html and 'StageSpec' not in html + ''.join(o.get('text', '') for o in outputs)
  s = json.load(open(workdir / 'notebook_summary.json'))
  lm = s['ml_ecs']['client_lm']
  assert len(lm) == s['rounds'] and lm[0] - lm[-1] >= LM_DROP, lm
  floor = max(s['floors']['floor/client/the_accuracy'], s['floors']['floor/client/majority_accuracy'])
  for method in ('ml_ecs', 'fedavg'):
    assert s[method]['client_accuracy'] >= floor + ACCURACY_OVER_FLOORS, (method, s[method], s['floors'])
  # Every class has a test window on which a client or the server answered with one of its sentences.
  assert s['classes_answered_exactly'] == s['classes'], s
