"""Generation quality: ROUGE (rouge-score package) and answer accuracy."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer

ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')


class TextScorer:
  """Scores generated answers against references; accuracy = the class whose
  description paraphrases are closest (ROUGE-L F1) to the generated text."""

  def __init__(self, descriptions: Sequence[Sequence[str]]):
    self.scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    self.descriptions = [list(d) for d in descriptions]

  @functools.lru_cache(maxsize=65536)
  def classify(self, text: str) -> int:
    """Class id whose paraphrases best match `text` (-1 for empty text)."""
    if not text.strip():
      return -1
    best = [max(self.scorer.score(d, text)['rougeL'].fmeasure for d in ds) for ds in self.descriptions]
    return int(np.argmax(best))

  @functools.lru_cache(maxsize=262144)
  def _score(self, reference: str, prediction: str) -> tuple[float, ...]:
    s = self.scorer.score(reference, prediction)
    return tuple(s[t].fmeasure for t in ROUGE_TYPES)

  def score(self, predictions: Sequence[str], references: Sequence[str], labels: Sequence[int]) -> dict[str, float]:
    """Mean ROUGE F1 of each type and accuracy over the samples."""
    if len(predictions) != len(references) or len(predictions) != len(labels):
      raise ValueError('predictions, references and labels must have the same length')
    if not predictions:
      return {**{t: float('nan') for t in ROUGE_TYPES}, 'accuracy': float('nan')}
    scores = np.array([self._score(r, p) for r, p in zip(references, predictions)])
    acc = np.mean([self.classify(p) == int(y) for p, y in zip(predictions, labels)])
    return {**dict(zip(ROUGE_TYPES, scores.mean(0).tolist())), 'accuracy': float(acc)}


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
  # python -m ml_ecs.evaluation: the ROUGE-LSum reference points of the embedded dataset.
  from ml_ecs.data import synthetic
  print(paraphrase_baselines(TextScorer(synthetic.DESCRIPTIONS)))
