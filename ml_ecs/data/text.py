"""Text side of a task: tokenizer, instruction tokens and per-sample answer tokens."""
from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.errors import ConfigError
from ml_ecs.data.tokenizer import HFTokenizer, TextTokenizer


@dataclasses.dataclass(frozen=True)
class TaskText:
  """Tokenised instruction (shared by all samples) and answers (one per sample)."""
  tokenizer: TextTokenizer | HFTokenizer
  instr: np.ndarray        # int32 [Li]
  instr_mask: np.ndarray   # float32 [Li]
  answers: np.ndarray      # int32 [N, La], ends with <eos>
  answer_mask: np.ndarray  # float32 [N, La]
  references: tuple[str, ...]  # reference text of each sample


def build_task_text(ds: MultimodalDataset, cfg: ml_collections.ConfigDict,
                    tokenizer_path: str | os.PathLike | None = None,
                    tokenizer: TextTokenizer | HFTokenizer | None = None) -> TaskText:
  """Uses `tokenizer` if given (e.g. the one of an imported Hugging Face backbone);
  else loads the tokenizer at `tokenizer_path` if it exists, else trains one on the
  dataset's descriptions and the instruction (and saves it there)."""
  if tokenizer is not None:
    tok = tokenizer
  elif tokenizer_path is not None and os.path.exists(tokenizer_path):
    tok = TextTokenizer.load(tokenizer_path)
  else:
    corpus = [t for d in ds.descriptions for t in d] + [cfg.instruction]
    tok = TextTokenizer.train(corpus, cfg.vocab_size)
    if tokenizer_path is not None:
      tok.save(tokenizer_path)
  refs = tuple(ds.texts())
  try:
    instr, instr_mask = tok.encode([cfg.instruction], cfg.instr_len, add_eos=False)
  except ValueError as e:
    raise ConfigError(f'text.instr_len too small: {e}') from None
  try:
    answers, answer_mask = tok.encode(refs, cfg.answer_len)
  except ValueError as e:
    raise ConfigError(f'text.answer_len too small: {e}') from None
  return TaskText(tok, instr[0], instr_mask[0], answers, answer_mask, refs)
