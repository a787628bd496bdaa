"""Constant-answer floors (ml_ecs/core/evaluate.py `floors`) and their rows in the comparison's report."""
import types

import ml_collections
import numpy as np
import pytest

from ml_ecs.core.evaluate import floors
from ml_ecs.core.scoring import TextScorer
from studies.compare import grid

DESCRIPTIONS = (('the person is running', 'someone runs fast'), ('the person is sitting', 'someone sits down'))


def _fake_setup():
  """Two classes; client 0 trains on class 1 mostly and is tested on [0, 1, 1]; client 1 trains on class 0 and
  is tested on [0, 0] plus windows past eval.max_test_per_client; the server trains on class 0, tests on [1, 1]."""
  labels = np.array([1, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1])
  refs = [DESCRIPTIONS[y][i % 2] for i, y in enumerate(labels)]
  spec = lambda train, test: types.SimpleNamespace(train_idx=np.array(train), test_idx=np.array(test))
  cohort = types.SimpleNamespace(num_real=2, data=types.SimpleNamespace(
      clients=[spec([0, 1, 2], [3, 4, 5]), spec([6, 7], [8, 2, 9]), spec([0], [0])]))   # the 3rd: padding
  return types.SimpleNamespace(
      scorer=TextScorer(DESCRIPTIONS), text=types.SimpleNamespace(references=refs),
      dataset=types.SimpleNamespace(labels=labels, class_names=('running', 'sitting')),
      cohorts=[cohort], cfg=ml_collections.ConfigDict({'eval': {'max_test_per_client': 2}}),
      partition=types.SimpleNamespace(public_train_idx=np.array([10, 11]), public_test_idx=np.array([12, 13, 0])),
      public_test=types.SimpleNamespace(count=2))


def test_floors_score_constant_answers_on_the_evaluated_windows():
  f = floors(_fake_setup())
  # "the" matches both classes equally: never a class, so never correct.
  assert f['floor/client/the_accuracy'] == f['floor/server/the_accuracy'] == 0.0
  # Majority answers: client 0 says class 1 on tests [0, 1] (its first 2): 1/2; client 1 says class 0 on [0, 0]: 1.
  assert f['floor/client/majority_accuracy'] == pytest.approx(0.75)
  assert f['floor/server/majority_accuracy'] == 0.0   # class 0 on a test split of class 1
  # Multi-reference ROUGE-LSum of an exact class sentence is 1 on its own class.
  assert f['floor/client/majority_rougeLsum_multi'] > 0.75 and 0 < f['floor/client/the_rougeLsum_multi'] < 0.5


def test_report_prints_floors_under_the_methods():
  row = lambda m, seed, **kw: {'method': m, 'missing_rate': 0.3, 'num_clients': 4, 'partition_seed': seed,
                               'train_seed': 0, 'cell': f'{m}{seed}', 'client_rougeLsum_multi': 0.8,
                               'client_accuracy': 0.5, **kw}
  floor = lambda v: {f: v for f, _ in grid.FLOORS}
  results = [row('ml_ecs', 0, **floor(0.2)), row('ml_ecs', 1, **floor(0.4)), row('local', 0, **floor(0.2)),
             row('local', 1, **floor(0.4))]
  text = grid.markdown_report(results)
  lines = [l for l in text.splitlines() if l.startswith('| floor:')]
  assert len(lines) == 2 and all('0.300' in l and '| 2 |' in l for l in lines), text
  assert not [l for l in grid.markdown_report([row('ml_ecs', 0)]).splitlines() if l.startswith('| floor:')]
