"""Generation quality: ROUGE (rouge-score package), multi-reference ROUGE-LSum and answer accuracy.

Single-reference ROUGE (the paper's metric) scores against the sample's own reference
paraphrase; `rougeLsum_multi` (the headline metric) is the best ROUGE-LSum over the
sample's reference and every paraphrase of its class, so it is >= the single-reference
score and equal to it when the class has one paraphrase.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer

ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')
# The keys of TextScorer.score; 'sentence': the share of answers that are, word for word, a sentence of some
# class (any class): whether the LM writes answers at all, apart from whether they are right.
SCORE_NAMES = ROUGE_TYPES + ('rougeLsum_multi', 'accuracy', 'sentence')
TIE_TOLERANCE = 1e-9   # ROUGE-L F1 scores closer than this are a tie in `TextScorer.classify`


class TextScorer:
  """Scores generated answers against references; accuracy = the class whose
  description paraphrases are closest (ROUGE-L F1) to the generated text, counted wrong when
  no single class is closest (a tie, or no overlap with any class)."""

  def __init__(self, descriptions: Sequence[Sequence[str]]):
    self.scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    self.descriptions = [list(d) for d in descriptions]
    self.sentences = frozenset(d for ds in self.descriptions for d in ds)

  @functools.lru_cache(maxsize=65536)
  def classify(self, text: str) -> int:
    """Class id whose paraphrases best match `text`; -1 (no class, so never correct) for empty
    text, for text that matches no class (best ROUGE-L 0) and for a tie between classes (an
    answer such as "the" that fits several classes equally names none of them)."""
    if not text.strip():
      return -1
    best = np.array([max(self.scorer.score(d, text)['rougeL'].fmeasure for d in ds) for ds in self.descriptions])
    top = best.max()
    if top <= 0.0 or np.sum(best >= top - TIE_TOLERANCE) > 1:
      return -1
    return int(np.argmax(best))

  @functools.lru_cache(maxsize=262144)
  def _score(self, reference: str, prediction: str) -> tuple[float, ...]:
    s = self.scorer.score(reference, prediction)
    return tuple(s[t].fmeasure for t in ROUGE_TYPES)

  def score(self, predictions: Sequence[str], references: Sequence[str], labels: Sequence[int]) -> dict[str, float]:
    """Mean ROUGE F1 of each type, multi-reference ROUGE-LSum, accuracy and the share of answers that are a
    class sentence word for word ('sentence') over the samples."""
    if len(predictions) != len(references) or len(predictions) != len(labels):
      raise ValueError('predictions, references and labels must have the same length')
    if not predictions:
      return {t: float('nan') for t in SCORE_NAMES}
    scores = np.array([self._score(r, p) for r, p in zip(references, predictions)])
    multi = np.mean([self.multi_reference(p, r, int(y)) for p, r, y in zip(predictions, references, labels)])
    acc = np.mean([self.classify(p) == int(y) for p, y in zip(predictions, labels)])
    sentence = np.mean([p.strip() in self.sentences for p in predictions])
    return {**dict(zip(ROUGE_TYPES, scores.mean(0).tolist())), 'rougeLsum_multi': float(multi),
            'accuracy': float(acc), 'sentence': float(sentence)}

  def is_paraphrase(self, text: str, label: int) -> bool:
    """Whether `text` is, word for word, one of class `label`'s sentences."""
    return text.strip() in self.descriptions[label]

  def multi_reference(self, prediction: str, reference: str, label: int) -> float:
    """Best ROUGE-LSum F1 over `reference` and every paraphrase of class `label`."""
    refs = {reference, *(self.descriptions[label] if 0 <= label < len(self.descriptions) else ())}
    i = ROUGE_TYPES.index('rougeLsum')
    return max(self._score(r, prediction)[i] for r in sorted(refs))


def paraphrase_baselines(scorer: TextScorer) -> dict[str, float]:
  """Reference points of ROUGE-LSum when the reference is one random paraphrase of the class:
  'other_paraphrase' = mean score of a different paraphrase of the right class;
  'oracle' = expected score of always answering the best single paraphrase of the right class."""
  other, oracle = [], []
  for paraphrases in scorer.descriptions:
    per_answer = []
    for answer in paraphrases:
      scores = [scorer._score(ref, answer)[ROUGE_TYPES.index('rougeLsum')] for ref in paraphrases]
      per_answer.append(float(np.mean(scores)))
      other += [sc for ref, sc in zip(paraphrases, scores) if ref != answer]
    oracle.append(max(per_answer))
  return {'other_paraphrase': float(np.mean(other)), 'oracle': float(np.mean(oracle))}


if __name__ == '__main__':
  # python -m ml_ecs.core.scoring: the ROUGE-LSum reference points of the embedded dataset.
  from ml_ecs.data import synthetic
  print(paraphrase_baselines(TextScorer(synthetic.DESCRIPTIONS)))
