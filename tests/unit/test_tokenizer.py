"""Offline BPE tokenizer."""
import numpy as np
import pytest

from ml_ecs.data.tokenizer import TextTokenizer


def test_train_save_load_roundtrip(tmp_path, dataset):
  texts = sorted(set(dataset.texts())) + ['describe the activity:']
  tok = TextTokenizer.train(texts, vocab_size=384)
  path = tmp_path / 'tokenizer.json'
  tok.save(path)
  tok2 = TextTokenizer.load(path)
  ids, mask = tok2.encode(texts, 16)
  assert ids.dtype == np.int32 and (ids[mask == 0] == tok2.pad_id).all()
  assert (ids[np.arange(len(texts)), mask.sum(1).astype(int) - 1] == tok2.eos_id).all()
  assert tok2.decode(ids) == texts
  np.testing.assert_array_equal(ids, tok.encode(texts, 16)[0])


def test_errors(tmp_path):
  tok = TextTokenizer.train(['a short text'], vocab_size=260)
  with pytest.raises(ValueError, match='more than the configured length'):
    tok.encode(['a short text that is far too long for four tokens'], 4)
  with pytest.raises(FileNotFoundError, match='tokenizer file'):
    TextTokenizer.load(tmp_path / 'missing.json')
