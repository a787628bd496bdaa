"""Offline byte-level BPE tokenizer, trained on the dataset's text and saved with the run."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, EOS = '<pad>', '<eos>'


class TextTokenizer:
  """A `tokenizers` byte-level BPE with <pad> = 0 and <eos> = 1."""

  def __init__(self, tokenizer: Tokenizer):
    self.tok = tokenizer
    self.pad_id = tokenizer.token_to_id(PAD)
    self.eos_id = tokenizer.token_to_id(EOS)
    if self.pad_id != 0 or self.eos_id != 1:
      raise ValueError(f'tokenizer must map {PAD!r} to 0 and {EOS!r} to 1, got {self.pad_id}, {self.eos_id}')

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int = 384) -> 'TextTokenizer':
    """Trains a byte-level BPE on `texts` (no network)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return cls(tok)

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'TextTokenizer':
    if not os.path.exists(path):
      raise FileNotFoundError(f'tokenizer file {path} not found: expected a tokenizers JSON file')
    return cls(Tokenizer.from_file(os.fspath(path)))

  def save(self, path: str | os.PathLike) -> None:
    tmp = f'{path}.tmp'
    self.tok.save(tmp)
    os.replace(tmp, path)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size()

  def encode(self, texts: Sequence[str], length: int, add_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, length], mask float32 [N, length]), right-padded with <pad>."""
    ids = np.zeros((len(texts), length), np.int32)
    mask = np.zeros((len(texts), length), np.float32)
    for i, enc in enumerate(self.tok.encode_batch(list(texts))):
      seq = enc.ids + ([self.eos_id] if add_eos else [])
      if len(seq) > length:
        raise ValueError(f'text {texts[i]!r} needs {len(seq)} tokens, more than the configured length {length}')
      ids[i, :len(seq)] = seq
      mask[i, :len(seq)] = 1.0
    return ids, mask

  def decode(self, ids: np.ndarray) -> list[str]:
    """Texts of a batch of generated ids, each cut at its first <eos>."""
    out = []
    for row in np.asarray(ids).tolist():
      if self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      out.append(self.tok.decode([t for t in row if t != self.pad_id]).strip())
    return out
