"""Offline byte-level BPE tokenizer, trained on the dataset's text and saved with the run."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, EOS = '<pad>', '<eos>'


class _Codec:
  """encode/decode shared by both tokenizers; subclasses give `_ids(texts)`, `_text(ids)`, `pad_id`, `eos_id`."""
  pad_id: int
  eos_id: int

  def encode(self, texts: Sequence[str], length: int, add_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, length], mask float32 [N, length]), right-padded with pad_id (mask 0)."""
    ids = np.full((len(texts), length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), length), np.float32)
    for i, seq in enumerate(self._ids(list(texts))):
      seq = list(seq) + ([self.eos_id] if add_eos else [])
      if len(seq) > length:
        raise ValueError(f'text {texts[i]!r} needs {len(seq)} tokens, more than the configured length {length}')
      ids[i, :len(seq)] = seq
      mask[i, :len(seq)] = 1.0
    return ids, mask

  def decode(self, ids: np.ndarray) -> list[str]:
    """Texts of a batch of generated ids, each cut at its first eos (pad ids dropped)."""
    out = []
    for row in np.asarray(ids).tolist():
      if self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      out.append(self._text([t for t in row if t != self.pad_id]).strip())
    return out


class TextTokenizer(_Codec):
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
    tmp = f'{path}.{os.getpid()}.tmp'   # per process: no two writers share a temp file
    self.tok.save(tmp)
    os.replace(tmp, path)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size()

  def _ids(self, texts: list[str]) -> list[list[int]]:
    return [enc.ids for enc in self.tok.encode_batch(texts)]

  def _text(self, ids: list[int]) -> str:
    return self.tok.decode(ids)


class HFTokenizer(_Codec):
  """A Hugging Face (transformers) tokenizer behind `TextTokenizer`'s interface.

  Used with imported GPT-2-family backbones (`ml_ecs.backbones.hf_gpt2`).

  Padding convention: GPT-2 has no pad token. Unless the tokenizer defines one,
  ``pad_id = eos_id`` (``<|endoftext|>``), as is usual for GPT-2. Padding
  positions are identified by the *mask* that `encode` returns, never by
  comparing ids with `pad_id` (that would also drop the real end-of-text
  token); `decode` cuts at the first ``eos_id``, so the two conventions agree.
  No BOS or other special tokens are added by `encode` (GPT-2 adds none).

  `vocab_size` is the number of rows of the model's embedding table, which may
  exceed the tokenizer's own size (checkpoints often pad the vocabulary).
  """

  def __init__(self, tokenizer, vocab_size: int | None = None):
    """tokenizer: a transformers tokenizer; vocab_size: the model's vocabulary (default len(tokenizer))."""
    self.tok = tokenizer
    if tokenizer.eos_token_id is None:
      raise ValueError(f'Hugging Face tokenizer {getattr(tokenizer, "name_or_path", "")!r} has no eos_token: '
                       'expected one (GPT-2 uses <|endoftext|>)')
    self.eos_id = int(tokenizer.eos_token_id)
    self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id
    n = len(tokenizer)
    self._vocab_size = n if vocab_size is None else int(vocab_size)
    if self._vocab_size < n:
      raise ValueError(f'tokenizer {getattr(tokenizer, "name_or_path", "")!r} has {n} tokens, more than the '
                       f'model vocabulary of {self._vocab_size}')

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, vocab_size: int | None = None) -> 'HFTokenizer':
    """Loads the tokenizer files of a local directory (tokenizer.json or vocab.json + merges.txt)."""
    if not os.path.isdir(path):
      raise FileNotFoundError(f'Hugging Face tokenizer directory {path} not found')
    files = set(os.listdir(path))
    if 'tokenizer.json' not in files and not {'vocab.json', 'merges.txt'} <= files:
      raise ValueError(f'cannot load a Hugging Face tokenizer from {path}: expected tokenizer.json or '
                       f'vocab.json + merges.txt, found {sorted(files)}')
    from transformers import AutoTokenizer
    try:
      tok = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
      raise ValueError(f'cannot load a Hugging Face tokenizer from {path}: expected tokenizer.json or '
                       f'vocab.json + merges.txt (and tokenizer_config.json): {e}') from e
    return cls(tok, vocab_size)

  load = from_pretrained

  def save(self, path: str | os.PathLike) -> None:
    """Writes the tokenizer files into directory `path` (transformers' save_pretrained)."""
    self.tok.save_pretrained(os.fspath(path))

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def _ids(self, texts: list[str]) -> list[list[int]]:
    return self.tok(texts, add_special_tokens=False)['input_ids']

  def _text(self, ids: list[int]) -> str:
    return self.tok.decode(ids)


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> 'TextTokenizer | HFTokenizer':
  """A directory of Hugging Face tokenizer files -> HFTokenizer; a tokenizers JSON file -> TextTokenizer."""
  if os.path.isdir(path):
    return HFTokenizer.from_pretrained(path, vocab_size)
  return TextTokenizer.load(path)
