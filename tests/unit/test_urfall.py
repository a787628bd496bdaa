"""Tests of the UR Fall loader: round trip through the CSV layout, and errors."""
from pathlib import Path

import numpy as np
import pytest

from ml_ecs.data import urfall
from ml_ecs.data.urfall import load_urfall, sequence_id, sequence_name, write_urfall

DIMS = {'acce': 3, 'depth': 8, 'rgb': 512}
# (fall, run, number of frames) of the synthetic recordings.
RECORDINGS = ((1, 3, 21), (0, 7, 16), (1, 12, 5))


def make_frames(seed=0):
  """Random per-frame data, rows shuffled so the loader has to sort them."""
  rng = np.random.default_rng(seed)
  fall = np.concatenate([np.full(n, f) for f, _, n in RECORDINGS])
  run = np.concatenate([np.full(n, r) for _, r, n in RECORDINGS])
  frame = np.concatenate([np.arange(1, n + 1) for *_, n in RECORDINGS])
  labels = rng.integers(-1, 2, len(fall))
  feats = {m: rng.normal(size=(len(fall), d)).astype(np.float32) for m, d in DIMS.items()}
  perm = rng.permutation(len(fall))
  return fall[perm], run[perm], frame[perm], labels[perm], {m: x[perm] for m, x in feats.items()}


@pytest.fixture
def frames():
  return make_frames()


@pytest.fixture
def data_dir(tmp_path, frames):
  write_urfall(tmp_path / 'urfall', *frames[:4], frames[4])
  return tmp_path / 'urfall'


def expected_windows(frames, window, stride):
  """Reference windows built frame by frame, independently of the loader."""
  fall, run, frame, labels, feats = frames
  out = {'seq': [], 'label': [], **{m: [] for m in feats}}
  for f, r, n in sorted(RECORDINGS, key=lambda t: sequence_id(t[0], t[1])):
    rows = [np.flatnonzero((fall == f) & (run == r) & (frame == k))[0] for k in range(1, n + 1)]
    for s in range(0, n - window + 1, stride):
      w = rows[s:s + window]
      out['seq'].append(1000 * f + r)
      out['label'].append({-1: 0, 0: 1, 1: 2}[int(labels[w[-1]])])
      for m in feats:
        out[m].append(feats[m][w])
  return out


@pytest.mark.parametrize('window,stride', [(8, None), (4, 3), (1, 1)])
def test_round_trip(data_dir, frames, window, stride):
  ds = load_urfall(data_dir, window=window, stride=stride)
  ref = expected_windows(frames, window, stride or window)
  n = len(ref['seq'])
  assert n > 0 and ds.num_samples == n
  assert ds.modality_names == ('acce', 'depth', 'rgb')
  for m, d in DIMS.items():
    assert ds.modalities[m].shape == (n, window, d)
    assert ds.modalities[m].dtype == np.float32
    np.testing.assert_array_equal(ds.modalities[m], np.stack(ref[m]))
  np.testing.assert_array_equal(ds.labels, ref['label'])
  np.testing.assert_array_equal(ds.sequence_ids, ref['seq'])
  assert ds.labels.dtype == np.int32 and ds.sequence_ids.dtype == np.int64
  assert ds.class_names == ('not lying', 'falling', 'lying')
  assert all(3 <= len(d) <= 4 for d in ds.descriptions)
  assert ds.text_ids.dtype == np.int32
  assert all(0 <= t < len(ds.descriptions[c]) for c, t in zip(ds.labels, ds.text_ids))
  assert ds.texts()[0] in ds.descriptions[ds.labels[0]]


def test_window_counts_and_sequence_names(data_dir):
  ds = load_urfall(data_dir, window=8)
  # adl-07: 16 frames -> 2 windows, fall-03: 21 -> 2, fall-12: 5 -> none.
  np.testing.assert_array_equal(ds.sequence_ids, [7, 7, 1003, 1003])
  assert [sequence_name(s) for s in ds.sequence_ids[[0, 2]]] == ['adl-07', 'fall-03']
  assert load_urfall(data_dir, window=8).text_ids.tolist() == ds.text_ids.tolist()  # deterministic


def test_known_labels(tmp_path):
  # One recording of 6 frames, labels chosen by hand; window 2 -> last frames 2, 4, 6.
  raw = np.array([-1, -1, -1, 0, 0, 1])
  n = len(raw)
  feats = {m: np.arange(n * d, dtype=np.float32).reshape(n, d) for m, d in DIMS.items()}
  write_urfall(tmp_path, np.ones(n, int), np.full(n, 2), np.arange(n), raw, feats)
  ds = load_urfall(tmp_path, window=2)
  assert ds.labels.tolist() == [0, 1, 2]
  assert ds.sequence_ids.tolist() == [1002] * 3
  np.testing.assert_array_equal(ds.modalities['acce'][1], feats['acce'][2:4])


def test_subset_of_modalities_needs_only_its_files(data_dir):
  (data_dir / 'rgb.csv').unlink()
  ds = load_urfall(data_dir, modalities=('depth',))
  assert ds.modality_names == ('depth',)
  assert ds.modalities['depth'].shape[1:] == (8, 8)


def test_header_and_hand_written_csv(tmp_path):
  lines = ['# fall,run,frame,label'] + [f'0, 1, {k}, -1' for k in range(3)]
  (tmp_path / 'y.csv').write_text('\n'.join(lines) + '\n')
  (tmp_path / 'acce.csv').write_text(''.join(f'0,1,{k},{k}.5,2,-3e-1\n' for k in (2, 0, 1)))
  ds = load_urfall(tmp_path, window=3, modalities=['acce'])
  np.testing.assert_array_equal(ds.modalities['acce'][0],
                                np.float32([[0.5, 2, -0.3], [1.5, 2, -0.3], [2.5, 2, -0.3]]))


def replace_line(path: Path, line_no: int, new: str):
  lines = path.read_text().splitlines()
  lines[line_no - 1] = new
  path.write_text('\n'.join(lines) + '\n')


def field_line(path: Path, line_no: int) -> list[str]:
  return path.read_text().splitlines()[line_no - 1].split(',')


@pytest.mark.parametrize('name', ['y.csv', 'acce.csv', 'depth.csv', 'rgb.csv'])
def test_missing_file(data_dir, name):
  (data_dir / name).unlink()
  with pytest.raises(FileNotFoundError) as e:
    load_urfall(data_dir)
  assert str(data_dir / name) in str(e.value)
  assert 'fall, run, frame' in str(e.value)


def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a directory'):
    load_urfall(tmp_path / 'nope')


@pytest.mark.parametrize('name,line_no', [('acce.csv', 5), ('depth.csv', 2), ('y.csv', 9)])
def test_wrong_column_count(data_dir, name, line_no):
  path = data_dir / name
  replace_line(path, line_no, ','.join(field_line(path, line_no)[:-1]))
  with pytest.raises(ValueError) as e:
    load_urfall(data_dir)
  msg = str(e.value)
  assert str(path) in msg and f'line {line_no}' in msg and 'columns' in msg


def test_wrong_column_count_every_row(data_dir):
  path = data_dir / 'acce.csv'
  lines = path.read_text().splitlines()
  path.write_text('\n'.join([lines[0]] + [l + ',0' for l in lines[1:]]) + '\n')
  with pytest.raises(ValueError) as e:
    load_urfall(data_dir)
  assert str(path) in str(e.value) and 'expected 6' in str(e.value) and 'found 7' in str(e.value)


@pytest.mark.parametrize('bad', ['2', '-2', '0.5', 'nan'])
def test_bad_label(data_dir, bad):
  path = data_dir / 'y.csv'
  f = field_line(path, 4)
  replace_line(path, 4, ','.join(f[:3] + [bad]))
  with pytest.raises(ValueError) as e:
    load_urfall(data_dir)
  msg = str(e.value)
  assert str(path) in msg and 'line 4' in msg and 'label' in msg


@pytest.mark.parametrize('name,col', [('rgb.csv', 100), ('depth.csv', 1), ('y.csv', 3)])
def test_non_numeric_cell(data_dir, name, col):
  path = data_dir / name
  f = field_line(path, 6)
  f[col] = 'abc'
  replace_line(path, 6, ','.join(f))
  with pytest.raises(ValueError) as e:
    load_urfall(data_dir)
  msg = str(e.value)
  assert str(path) in msg and 'line 6' in msg and f'column {col + 1}' in msg and "'abc'" in msg


@pytest.mark.parametrize('bad', ['nan', 'inf'])
def test_non_finite_value(data_dir, bad):
  path = data_dir / 'depth.csv'
  f = field_line(path, 7)
  f[5] = bad
  replace_line(path, 7, ','.join(f))
  with pytest.raises(ValueError) as e:
    load_urfall(data_dir)
  msg = str(e.value)
  assert str(path) in msg and 'line 7' in msg and 'column 6' in msg and 'finite' in msg


def test_frame_missing_in_a_modality(data_dir):
  path = data_dir / 'depth.csv'
  lines = path.read_text().splitlines()
  fall, run, frame = lines[3].split(',')[:3]
  path.write_text('\n'.join(lines[:3] + lines[4:]) + '\n')
  with pytest.raises(ValueError) as e:
    load_urfall(data_dir)
  msg = str(e.value)
  assert str(path) in msg and f'frame {frame} of' in msg
  assert sequence_name(sequence_id(int(fall), int(run))) in msg


def test_unlabelled_frame_in_a_modality(data_dir):
  path = data_dir / 'y.csv'
  lines = path.read_text().splitlines()
  path.write_text('\n'.join(lines[:2] + lines[3:]) + '\n')
  with pytest.raises(ValueError) as e:
    load_urfall(data_dir)
  assert 'acce.csv' in str(e.value) and 'no label row' in str(e.value)


def test_duplicate_frame(data_dir):
  path = data_dir / 'acce.csv'
  lines = path.read_text().splitlines()
  path.write_text('\n'.join(lines + [lines[2]]) + '\n')
  with pytest.raises(ValueError) as e:
    load_urfall(data_dir)
  msg = str(e.value)
  assert str(path) in msg and 'lines 3 and' in msg and 'twice' in msg


@pytest.mark.parametrize('col,bad,what', [(0, '2', 'fall'), (2, '1.5', 'frame'), (1, '-1', 'run')])
def test_bad_key(data_dir, col, bad, what):
  path = data_dir / 'acce.csv'
  f = field_line(path, 3)
  f[col] = bad
  replace_line(path, 3, ','.join(f))
  with pytest.raises(ValueError) as e:
    load_urfall(data_dir)
  msg = str(e.value)
  assert str(path) in msg and 'line 3' in msg and f'({what})' in msg


def test_empty_file(data_dir):
  (data_dir / 'acce.csv').write_text('# only a header\n')
  with pytest.raises(ValueError, match='no data rows'):
    load_urfall(data_dir)


def test_bad_arguments(data_dir):
  with pytest.raises(ValueError, match='modalities'):
    load_urfall(data_dir, modalities=('acce', 'gyro'))
  with pytest.raises(ValueError, match='window'):
    load_urfall(data_dir, window=0)
  with pytest.raises(ValueError, match='stride'):
    load_urfall(data_dir, stride=-1)
  with pytest.raises(ValueError, match='no recording has at least window=50'):
    load_urfall(data_dir, window=50)


def test_write_rejects_bad_input(tmp_path, frames):
  fall, run, frame, labels, feats = frames
  with pytest.raises(ValueError, match='labels'):
    write_urfall(tmp_path, fall, run, frame, labels + 1, feats)
  with pytest.raises(ValueError, match='depth has shape'):
    write_urfall(tmp_path, fall, run, frame, labels, {'depth': feats['depth'][:, :7]})


def test_constants_match_layout():
  assert {m: len(c) for m, c in urfall.FEATURE_COLUMNS.items()} == DIMS
  assert len(urfall.DESCRIPTIONS) == len(urfall.CLASS_NAMES) == 3


def test_urfall_config_partitions_and_tokenizes(tmp_path):
  """configs/urfall.py works end to end up to the model inputs on test-written files."""
  import sys
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
  from configs import urfall as urfall_config
  from ml_ecs.data.partition import partition
  from ml_ecs.data.loaders import load_dataset
  from ml_ecs.data.text import build_task_text
  rng = np.random.default_rng(0)
  fall, run, frame, labels = [], [], [], []
  for f in (0, 1):
    for r in range(1, 13):
      n = 24
      fall += [f] * n
      run += [r] * n
      frame += list(range(n))
      labels += list(rng.choice([-1, 0, 1], n))
  n = len(fall)
  write_urfall(tmp_path, np.array(fall), np.array(run), np.array(frame), np.array(labels),
               {'acce': rng.normal(size=(n, 3)), 'depth': rng.normal(size=(n, 8)), 'rgb': rng.normal(size=(n, 512))})
  cfg = urfall_config.get_config()
  cfg.data.path = str(tmp_path)
  cfg.data.num_clients = 4
  cfg.data.public_per_client = 4
  ds = load_dataset(cfg.data)
  assert set(ds.modality_names) == set(cfg.data.encoders.keys())
  p = partition(ds, cfg.data)
  assert len(p.clients) == 4 and all(len(c.train_idx) for c in p.clients)
  text = build_task_text(ds, cfg.text)
  assert cfg.edge_model.prompt_len + cfg.text.instr_len + cfg.text.answer_len <= cfg.edge_model.backbone.max_len
  assert text.answers.shape == (ds.num_samples, cfg.text.answer_len)
