"""Dataset sources (npz, Hugging Face datasets, TFDS), missing samples, and their partitioning.

Every test writes the small dataset it reads. Tests of the hf/tfds sources skip where
`datasets`/`tensorflow_datasets` are absent (they are installed in CI: `.[data]`).
"""
import copy
import json

import ml_collections
import numpy as np
import pytest

from ml_ecs.data.cohort_data import full_modality_split
from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.data.loaders import (check_data_config, data_source_fields, from_arrays, load_dataset,
                                 parse_modality_columns, save_npz)
from ml_ecs.data.partition import partition

N = 24
CLASSES = ('sit', 'walk', 'fall')
PARAS = (('sitting still', 'a person sits'), ('walking', 'a person walks', 'someone strolls'), ('falling',))
ACCEL_MISSING = (3, 7)   # rows whose accel is missing
DEPTH_MISSING = (10,)


def _raw(seed: int = 0) -> dict:
  """Arrays of a small dataset; missing samples are all-NaN rows."""
  rng = np.random.default_rng(seed)
  labels = np.arange(N) % 3
  accel = rng.normal(size=(N, 4, 3)).astype(np.float32)
  depth = rng.normal(size=(N, 5)).astype(np.float32)
  accel[list(ACCEL_MISSING)] = np.nan
  depth[list(DEPTH_MISSING)] = np.nan
  text_ids = np.array([i // 3 % len(PARAS[c]) for i, c in enumerate(labels)])
  texts = [PARAS[c][t] for c, t in zip(labels, text_ids)]
  return dict(accel=accel, depth=depth, labels=labels, seq=np.arange(N) // 2 + 100, texts=texts, text_ids=text_ids)


def _cfg(**kw) -> ml_collections.ConfigDict:
  c = data_source_fields()
  for k, v in kw.items():
    if k == 'columns':
      c.columns.update(v)
    else:
      c[k] = v
  return c


def _check_round_trip(ds: MultimodalDataset, raw: dict, descriptions=PARAS) -> None:
  """`ds` holds exactly the arrays, labels, sequences, texts and missingness of `raw`."""
  for m in ('accel', 'depth'):
    x = raw[m]
    missing = np.isnan(x.reshape(N, -1)).all(1)
    np.testing.assert_array_equal(ds.present[m], ~missing)
    np.testing.assert_array_equal(ds.modalities[m][~missing], x[~missing])
    assert ds.modalities[m].dtype == np.float32 and not ds.modalities[m][missing].any()
  np.testing.assert_array_equal(ds.labels, raw['labels'])
  np.testing.assert_array_equal(ds.sequence_ids, raw['seq'])
  assert ds.class_names == CLASSES
  assert ds.descriptions == descriptions
  assert ds.texts() == raw['texts']


# ----------------------------------------------------------------------------- in memory, npz

def test_from_arrays_marks_nan_rows_missing():
  raw = _raw()
  ds = from_arrays({'accel': raw['accel'], 'depth': raw['depth']}, raw['labels'], CLASSES, raw['seq'],
                   PARAS, raw['text_ids'])
  _check_round_trip(ds, raw)
  assert not ds.all_present
  np.testing.assert_array_equal(ds.presence(('depth', 'accel'))[[3, 10, 0]],
                                [[True, False], [False, True], [True, True]])
  # without NaN rows: no presence masks at all; defaults for sequences and texts
  full = from_arrays({'a': np.zeros((3, 2))}, [0, 1, 1], ('x', 'y'))
  assert full.present is None and full.all_present
  assert full.descriptions == (('x',), ('y',)) and full.texts() == ['x', 'y', 'y']
  np.testing.assert_array_equal(full.sequence_ids, [0, 1, 2])


def test_npz_round_trip(tmp_path):
  raw = _raw()
  ds = from_arrays({'accel': raw['accel'], 'depth': raw['depth']}, raw['labels'], CLASSES, raw['seq'],
                   PARAS, raw['text_ids'])
  save_npz(ds, tmp_path / 'mine.npz')
  back = load_dataset(_cfg(name='npz', path=str(tmp_path)))   # a directory with one .npz
  _check_round_trip(back, raw)
  only = load_dataset(_cfg(name='npz', path=str(tmp_path / 'mine.npz'), columns={'modalities': ('depth', 'acc=accel')}))
  assert only.modality_names == ('depth', 'acc')
  np.testing.assert_array_equal(only.modalities['acc'], back.modalities['accel'])
  np.testing.assert_array_equal(only.present['acc'], back.present['accel'])
  # a hand-written npz: NaN rows mark missing samples, descriptions default to the class names
  np.savez(tmp_path / 'plain.npz', x_accel=raw['accel'], x_depth=raw['depth'], labels=raw['labels'],
           class_names=np.array(CLASSES))
  plain = load_dataset(_cfg(name='npz', path=str(tmp_path / 'plain.npz')))
  np.testing.assert_array_equal(plain.present['accel'], ~np.isin(np.arange(N), ACCEL_MISSING))
  assert plain.descriptions == tuple((c,) for c in CLASSES)


# ----------------------------------------------------------------------------- hf

def _hf_dataset(datasets, raw, accel_feature=True):
  feats = datasets.Features({
      'accel': datasets.Array2D((4, 3), 'float32') if accel_feature else datasets.List(datasets.List(datasets.Value('float32'))),
      'depth': datasets.List(datasets.Value('float32'), length=5),
      'y': datasets.ClassLabel(names=list(CLASSES)),
      'rec': datasets.Value('int64'),
      'caption': datasets.Value('string'),
  })
  accel = [None if i in ACCEL_MISSING else raw['accel'][i] for i in range(N)]  # None = missing
  return datasets.Dataset.from_dict(
      {'accel': accel, 'depth': list(raw['depth']), 'y': raw['labels'], 'rec': raw['seq'],
       'caption': raw['texts']}, features=feats)


HF_COLUMNS = {'label': 'y', 'sequence_id': 'rec', 'text': 'caption'}


def test_hf_save_to_disk_round_trip(tmp_path):
  datasets = pytest.importorskip('datasets')
  raw, other = _raw(0), _raw(1)
  dd = datasets.DatasetDict({'train': _hf_dataset(datasets, raw), 'test': _hf_dataset(datasets, other)})
  dd.save_to_disk(str(tmp_path / 'dd'))
  ds = load_dataset(_cfg(name='hf', path=str(tmp_path / 'dd'), columns=HF_COLUMNS))
  assert ds.modality_names == ('accel', 'depth')
  # distinct texts per class, in order of appearance, become the paraphrases
  _check_round_trip(ds, raw)
  _check_round_trip(load_dataset(_cfg(name='hf', path=str(tmp_path / 'dd'), split='test', columns=HF_COLUMNS)), other)
  _hf_dataset(datasets, raw, accel_feature=False).save_to_disk(str(tmp_path / 'one'))
  _check_round_trip(load_dataset(_cfg(name='hf', path=str(tmp_path / 'one'), columns=HF_COLUMNS)), raw)


def test_hf_parquet_round_trip(tmp_path):
  datasets = pytest.importorskip('datasets')
  import pyarrow as pa
  import pyarrow.parquet as pq
  raw, other = _raw(0), _raw(1)
  (tmp_path / 'data').mkdir()
  _hf_dataset(datasets, raw).to_parquet(str(tmp_path / 'data' / 'train-00000-of-00001.parquet'))
  _hf_dataset(datasets, other).to_parquet(str(tmp_path / 'data' / 'test-00000-of-00001.parquet'))
  cols = dict(HF_COLUMNS, modalities=('acc=accel', 'depth'))
  ds = load_dataset(_cfg(name='hf', path=str(tmp_path), columns=cols))
  assert ds.modality_names == ('acc', 'depth')
  ds = MultimodalDataset({'accel': ds.modalities['acc'], 'depth': ds.modalities['depth']}, ds.labels,
                         ds.sequence_ids, ds.class_names, ds.descriptions, ds.text_ids,
                         {'accel': ds.present['acc'], 'depth': ds.present['depth']})
  _check_round_trip(ds, raw)
  _check_round_trip(load_dataset(_cfg(name='hf', path=str(tmp_path), split='test', columns=HF_COLUMNS)), other)
  # plain parquet (no HF metadata): string labels name the classes (sorted), no text column
  table = pa.table({'depth': pa.array([None if np.isnan(r).all() else list(r) for r in raw['depth']],
                                      pa.list_(pa.float32())),
                    'gyro': pa.array(np.ones((N, 2)).tolist(), pa.list_(pa.float64())),
                    'label': [CLASSES[c] for c in raw['labels']]})
  pq.write_table(table, tmp_path / 'plain.parquet')
  plain = load_dataset(_cfg(name='hf', path=str(tmp_path / 'plain.parquet')))
  assert plain.class_names == tuple(sorted(CLASSES)) and plain.descriptions == tuple((c,) for c in sorted(CLASSES))
  assert [plain.class_names[c] for c in plain.labels] == [CLASSES[c] for c in raw['labels']]
  np.testing.assert_array_equal(plain.present['depth'], ~np.isin(np.arange(N), DEPTH_MISSING))
  np.testing.assert_array_equal(plain.sequence_ids, np.arange(N))


# ----------------------------------------------------------------------------- tfds

def _write_tfds(tfds, data_dir, raw, other, shape=(4, 3)):
  class LoaderTestData(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
          'accel': tfds.features.Tensor(shape=shape, dtype=np.float32),
          'depth': tfds.features.Tensor(shape=(5,), dtype=np.float32),
          'y': tfds.features.ClassLabel(names=list(CLASSES)),
          'rec': np.int64,
          'caption': tfds.features.Text(),
      }))

    def _split_generators(self, dl_manager):
      return {'train': self._examples(raw), 'test': self._examples(other)}

    def _examples(self, r):
      for i in range(N):
        yield i, {'accel': r['accel'][i].reshape(shape), 'depth': r['depth'][i], 'y': int(r['labels'][i]),
                  'rec': int(r['seq'][i]), 'caption': r['texts'][i]}

    def _generate_examples(self):
      raise NotImplementedError

  builder = LoaderTestData(data_dir=str(data_dir), file_format='array_record')
  builder.download_and_prepare()
  from pathlib import Path
  return Path(builder.data_dir)


def test_tfds_round_trip_without_tensorflow(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  import sys
  raw, other = _raw(0), _raw(1)
  vdir = _write_tfds(tfds, tmp_path, raw, other)
  ds = load_dataset(_cfg(name='tfds', path=str(vdir), columns=HF_COLUMNS))
  _check_round_trip(ds, raw)
  # the data directory itself is found too (one dataset below it), and the other split
  _check_round_trip(load_dataset(_cfg(name='tfds', path=str(tmp_path), split='test', columns=HF_COLUMNS)), other)
  assert 'tensorflow' not in sys.modules


def test_tfds_tfrecord_format_says_tensorflow_is_needed(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  vdir = _write_tfds(tfds, tmp_path, _raw(0), _raw(1))
  info = json.loads((vdir / 'dataset_info.json').read_text())
  info['fileFormat'] = 'tfrecord'   # as if prepared with TFDS's default format
  (vdir / 'dataset_info.json').write_text(json.dumps(info))
  with pytest.raises(ValueError, match=r"stored as tfrecord.*only through TensorFlow.*file_format='array_record'"):
    load_dataset(_cfg(name='tfds', path=str(vdir), columns=HF_COLUMNS))


def test_tfds_bad_inputs(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  vdir = _write_tfds(tfds, tmp_path, _raw(0), _raw(1))
  with pytest.raises(ValueError, match=r"labels feature 'label' not found in .*1\.0\.0; features are \[.*'caption'"):
    load_dataset(_cfg(name='tfds', path=str(vdir)))
  with pytest.raises(ValueError, match=r"split 'valid' not found in .*splits are \['train', 'test'\]"):
    load_dataset(_cfg(name='tfds', path=str(vdir), split='valid', columns=HF_COLUMNS))
  with pytest.raises(ValueError, match=r"not a prepared TFDS dataset directory"):
    load_dataset(_cfg(name='tfds', path=str(tmp_path / 'downloads'), columns=HF_COLUMNS))


# ----------------------------------------------------------------------------- bad inputs

def test_npz_bad_inputs(tmp_path):
  raw = _raw()
  f = tmp_path / 'd.npz'
  good = dict(x_accel=raw['accel'], x_depth=np.ones((N, 2)), labels=raw['labels'], class_names=np.array(CLASSES))

  def load(**arrays):
    np.savez(f, **{**good, **arrays})
    return load_dataset(_cfg(name='npz', path=str(f)))

  load()
  np.savez(f, x_accel=raw['accel'], class_names=np.array(CLASSES))
  with pytest.raises(ValueError, match=r"d\.npz has no 'labels' array; keys are \['class_names', 'x_accel'\]"):
    load_dataset(_cfg(name='npz', path=str(f)))
  with pytest.raises(ValueError, match=r"d\.npz: x_accel has shape \(23, 4, 3\), expected \(24, \.\.\.\)"):
    load(x_accel=raw['accel'][:23])
  with pytest.raises(ValueError, match=r"label 3 at row 5 is outside \[0, 3\)"):
    load(labels=np.where(np.arange(N) == 5, 3, raw['labels']))
  partial = raw['accel'].copy()
  partial[17, 0, 1] = np.nan
  with pytest.raises(ValueError, match=r"d\.npz: x_accel row 17 has 1 NaN of 12 values"):
    load(x_accel=partial)
  with pytest.raises(ValueError, match=r"row 3 has every modality missing"):
    load(x_depth=np.where(np.isin(np.arange(N), ACCEL_MISSING)[:, None], np.nan, np.ones((N, 2))))
  with pytest.raises(ValueError, match=r"text id 2 at row 0 is outside the 1 descriptions of its class 'sit'"):
    load(text_ids=np.full(N, 2))
  with pytest.raises(ValueError, match=r"x_accel has dtype <U1"):
    load(x_accel=np.array(['a'] * N))
  with pytest.raises(ValueError, match=r"modalities \(x_<name> keys\) \['gyro'\] not found in .*d\.npz"):
    np.savez(f, **good)
    load_dataset(_cfg(name='npz', path=str(f), columns={'modalities': ('gyro',)}))
  with pytest.raises(FileNotFoundError, match='nope.npz does not exist'):
    load_dataset(_cfg(name='npz', path=str(tmp_path / 'nope.npz')))


def test_hf_bad_inputs(tmp_path):
  datasets = pytest.importorskip('datasets')
  raw = _raw()
  d = str(tmp_path / 'hf')
  _hf_dataset(datasets, raw).save_to_disk(d)
  with pytest.raises(ValueError, match=r"labels column 'label' not found in .*hf; columns are "
                                        r"\['accel', 'depth', 'y', 'rec', 'caption'\]"):
    load_dataset(_cfg(name='hf', path=d))
  with pytest.raises(ValueError, match=r"text column 'descr' not found"):
    load_dataset(_cfg(name='hf', path=d, columns=dict(HF_COLUMNS, text='descr')))
  rows = [r.tolist() for r in raw['accel']]
  rows[17] = rows[17][:3]   # one row is 3 x 3 instead of 4 x 3
  ragged = datasets.Dataset.from_dict({'accel': rows, 'y': raw['labels']})
  ragged.save_to_disk(str(tmp_path / 'ragged'))
  with pytest.raises(ValueError, match=r"column 'accel' row 17 has shape \(3, 3\), expected \(4, 3\)"):
    load_dataset(_cfg(name='hf', path=str(tmp_path / 'ragged'), columns={'label': 'y'}))
  inner = [r.tolist() for r in raw['depth']]
  inner[4][2] = None
  none_inside = datasets.Dataset.from_dict({'depth': inner, 'y': raw['labels']})
  none_inside.save_to_disk(str(tmp_path / 'inner'))
  with pytest.raises(ValueError, match=r"column 'depth' row 4 has 1 NaN of 5 values"):
    load_dataset(_cfg(name='hf', path=str(tmp_path / 'inner'), columns={'label': 'y'}))
  strings = datasets.Dataset.from_dict({'accel': [['a', 'b']] * N, 'y': raw['labels']})
  strings.save_to_disk(str(tmp_path / 'strings'))
  with pytest.raises(ValueError, match=r"column 'accel' holds string values, expected numbers"):
    load_dataset(_cfg(name='hf', path=str(tmp_path / 'strings'), columns={'label': 'y'}))
  floats = datasets.Dataset.from_dict({'accel': [[1.0]] * N, 'y': raw['labels'] + 0.5})
  floats.save_to_disk(str(tmp_path / 'floats'))
  with pytest.raises(ValueError, match=r"labels column 'y' has type double, expected integers"):
    load_dataset(_cfg(name='hf', path=str(tmp_path / 'floats'), columns={'label': 'y'}))
  dd = datasets.DatasetDict({'train': _hf_dataset(datasets, raw)})
  dd.save_to_disk(str(tmp_path / 'dd'))
  with pytest.raises(ValueError, match=r"split 'test' not found in .*dd; splits are \['train'\]"):
    load_dataset(_cfg(name='hf', path=str(tmp_path / 'dd'), split='test', columns=HF_COLUMNS))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match=r"holds no \.parquet files and is not a datasets save_to_disk"):
    load_dataset(_cfg(name='hf', path=str(tmp_path / 'empty')))


def test_check_data_config():
  check_data_config(data_source_fields())
  assert parse_modality_columns('accel, d=depth') == {'accel': 'accel', 'd': 'depth'}
  for bad, msg in [
      (dict(name='csv'), r"data\.name must be one of \('embedded', 'synthetic', 'urfall', 'npz', 'hf', 'tfds'\)"),
      (dict(name='hf'), r'data\.path must name the dataset file or directory for data\.name=.hf.'),
      (dict(name='hf', path='/x', split=''), r'data\.split must be a non-empty string'),
      (dict(columns={'modalities': ('accel=',)}), r"entry 'accel=' must be 'name' or 'name=column'"),
      (dict(columns={'modalities': ('a', 'a=b')}), r"names modality 'a' twice"),
      (dict(columns={'label': ''}), r'data\.columns\.label must be a non-empty column name'),
      (dict(columns={'modalities': ('y',), 'label': 'y'}), r"reads columns \['y'\] that are also the label"),
      (dict(class_names=('a', '')), r'data\.class_names must be a sequence of non-empty strings'),
  ]:
    with pytest.raises(ValueError, match=msg):
      check_data_config(_cfg(**bad))
  c = _cfg()
  with c.unlocked():   # a typo of a field name
    c.columns.labels = 'y'
  with pytest.raises(ValueError, match=r"data\.columns has unknown fields \['labels'\]"):
    check_data_config(c)
  # a config without any of the new fields still loads the embedded dataset
  assert load_dataset(ml_collections.ConfigDict({'name': 'embedded'})).num_samples == 3000


# ----------------------------------------------------------------------------- partitioning

def test_partition_honours_missing_samples(dataset, tiny_config):
  cfg = copy.deepcopy(tiny_config.data)
  cfg.num_clients = 6
  cfg.modality_sets = ()
  cfg.num_device_types = 0
  # every modality present (explicit masks): the partition is the one of the plain dataset
  all_true = MultimodalDataset(dataset.modalities, dataset.labels, dataset.sequence_ids, dataset.class_names,
                               dataset.descriptions, dataset.text_ids,
                               {m: np.ones(dataset.num_samples, bool) for m in dataset.modality_names})
  for a, b in zip(partition(dataset, cfg).clients, partition(all_true, cfg).clients):
    for f in ('train_idx', 'test_idx', 'public_idx', 'train_mask', 'test_mask', 'public_mask'):
      np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  rng = np.random.default_rng(0)
  mods = dataset.modality_names
  present = {m: rng.random(dataset.num_samples) >= 0.4 for m in mods}
  present[mods[0]] |= ~np.stack(list(present.values()), 1).any(1)   # at least one per sample
  ds = MultimodalDataset(dataset.modalities, dataset.labels, dataset.sequence_ids, dataset.class_names,
                         dataset.descriptions, dataset.text_ids, present)
  p = partition(ds, cfg)
  for c in p.clients:
    avail = ds.presence(c.modalities)
    for split in ('train', 'test', 'public'):
      idx, mask = getattr(c, f'{split}_idx'), getattr(c, f'{split}_mask')
      assert mask.shape == (len(idx), len(c.modalities))
      assert not (mask.astype(bool) & ~avail[idx]).any()    # missing in the data -> masked
      assert (mask.sum(1) >= 1).all()                         # every sample keeps an input
  assert any(len(c.modalities) < len(mods) for c in p.clients)   # the check above meant something
  # one client that has only 'depth': exactly the private samples with depth present are its
  one = copy.deepcopy(cfg)
  one.num_clients, one.modality_sets = 1, (('depth',),)
  q = partition(ds, one)
  public = np.isin(ds.sequence_ids, ds.sequence_ids[np.concatenate([q.public_train_idx, q.public_test_idx,
                                                                   q.public_holdout_idx])])   # all public recordings
  (c,) = q.clients
  np.testing.assert_array_equal(np.sort(np.concatenate([c.train_idx, c.test_idx])),
                                np.flatnonzero(~public & present['depth']))
  assert c.train_mask.all() and c.public_mask.all() and present['depth'][c.public_idx].all()
  # the server's public view masks exactly the data's missing samples
  from ml_ecs.data.text import build_task_text
  text = build_task_text(ds, tiny_config.text)
  split = full_modality_split(ds, text, p.public_train_idx)
  np.testing.assert_array_equal(np.asarray(split.mod_mask[0]), ds.presence(mods)[p.public_train_idx])
