"""ROUGE scoring and answer accuracy."""
import pytest

from ml_ecs.data import synthetic
from ml_ecs.core.scoring import TextScorer, paraphrase_baselines


def test_score_and_accuracy():
  s = TextScorer(synthetic.DESCRIPTIONS)
  refs = ['the person is running', 'someone is lying flat on the ground']
  out = s.score(['the person is running', 'a person is walking'], refs, [4, 2])
  assert out['rougeLsum'] < 1.0 and out['rouge1'] > 0.5
  assert out['accuracy'] == 0.5                         # second answer names the wrong activity
  assert s.score(refs, refs, [4, 2])['rougeLsum'] == pytest.approx(1.0)
  assert s.classify('') == -1 and s.classify('someone has a sudden fall') == 5
  with pytest.raises(ValueError, match='same length'):
    s.score(['x'], [], [])


def test_paraphrase_reference_points():
  b = paraphrase_baselines(TextScorer(synthetic.DESCRIPTIONS))
  assert 0.2 < b['other_paraphrase'] < b['oracle'] < 0.7
