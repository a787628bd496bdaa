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
  assert out['sentence'] == 0.5                         # 'a person is walking' is no class's sentence
  wrong_class = s.score(['a person walks at a steady pace', ' someone is running fast '], refs, [3, 2])
  assert wrong_class['sentence'] == 1.0 and wrong_class['accuracy'] == 0.5   # a sentence of any class counts
  assert s.score(refs, refs, [4, 2])['rougeLsum'] == pytest.approx(1.0)
  assert s.classify('') == -1 and s.classify('someone has a sudden fall') == 5
  with pytest.raises(ValueError, match='same length'):
    s.score(['x'], [], [])


def test_ties_and_no_match_score_as_no_class():
  """An answer equally close to several classes ("the" matches five classes at ROUGE-L 0.4) or to
  none names no class: it is wrong for every label, never the first class (the old argmax tie-break)."""
  s = TextScorer(synthetic.DESCRIPTIONS)
  assert s.classify('the') == -1 and s.classify('xyzzy') == -1
  out = s.score(['the', 'xyzzy'], ['the person is standing', 'the person is standing'], [0, 0])
  assert out['accuracy'] == 0.0
  assert TextScorer([['red car'], ['red bus']]).classify('red') == -1    # exact tie of two classes
  assert TextScorer([['red car'], ['red bus']]).classify('red bus') == 1


def test_paraphrase_reference_points():
  b = paraphrase_baselines(TextScorer(synthetic.DESCRIPTIONS))
  assert 0.2 < b['other_paraphrase'] < b['oracle'] < 0.7


def test_a_paraphrase_is_one_of_its_class_sentences_word_for_word():
  s = TextScorer(synthetic.DESCRIPTIONS)
  sentence = synthetic.DESCRIPTIONS[4][0]
  assert s.is_paraphrase(sentence, 4) and s.is_paraphrase(f' {sentence} ', 4)
  assert not s.is_paraphrase(sentence, 2) and not s.is_paraphrase(sentence + ' fast', 4)
