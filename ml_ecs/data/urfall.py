"""UR Fall Detection (URFD) features: accelerometer, depth and RGB per frame.

Source of the layout. The "Multimodal Federated Learning on IoT Data" code
(IoTDI'22, github.com/yuchenzhao/iotdi22-mmfl, `src/utils.py`: `gen_ur_fall`
writes and `load_data` reads `ur_fall.mat`) stores four tables of per-frame
rows keyed by (fall, run, frame):

  acce  [F, 3 + 3]    fall, run, frame, acce_x, acce_y, acce_z
  depth [F, 3 + 8]    fall, run, frame, HeightWidthRatio, MajorMinorRatio,
                      BoundingBoxOccupancy, MaxStdXZ, HHmaxRatio, H, D, P40
  rgb   [F, 3 + 512]  fall, run, frame, ResNet-18 features of the cam0 frame
  y     [F, 3 + 1]    fall, run, frame, label

where fall is 1 for the `fall-NN` recordings (runs 1-30) and 0 for the `adl-NN`
ones (runs 1-40). The depth features and the label come from URFD's
`urfall-cam0-{falls,adls}.csv`, whose annotation is -1: the person is not
lying, 0: a temporary pose while the person is falling, 1: the person is lying
on the ground.

On-disk layout read here (plain CSV, so only numpy is needed): a directory
holding the same four tables, one file each, comma-separated, one frame per
line, lines starting with '#' (a header) and blank lines ignored:

  y.csv      fall, run, frame, label        label in {-1, 0, 1} (raw URFD)
  acce.csv   fall, run, frame, 3 values
  depth.csv  fall, run, frame, 8 values
  rgb.csv    fall, run, frame, 512 values

fall is 0 or 1, run an integer in [0, 1000), frame an integer >= 0. Rows may
come in any order; every (fall, run, frame) in y.csv must appear exactly once
in every modality file read, and vice versa. From the IoTDI'22 `ur_fall.mat`
(`m = scipy.io.loadmat(...)`), whose labels are already shifted to {0, 1, 2}:
`write_urfall(d, *m['y'][:, :3].T, m['y'][:, 3] - 1, {k: m[k][:, 3:] for k in
('acce', 'depth', 'rgb')})`, provided the rows of the four arrays match (they
do in files made by `gen_ur_fall`).

Windows. Within each recording, frames are ordered by frame number and cut
into windows of `window` consecutive rows every `stride` rows; trailing frames
that do not fill a whole window, and recordings shorter than `window`, yield
no window. A window's label is the label of its last frame. Values are
returned as read (the IoTDI'22 code z-scores acce and depth per recording;
normalisation is left to the caller).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ml_ecs.data.dataset import MultimodalDataset

KEY_COLUMNS = ('fall', 'run', 'frame')
FEATURE_COLUMNS: dict[str, tuple[str, ...]] = {
    'acce': ('acce_x', 'acce_y', 'acce_z'),
    'depth': ('HeightWidthRatio', 'MajorMinorRatio', 'BoundingBoxOccupancy', 'MaxStdXZ',
              'HHmaxRatio', 'H', 'D', 'P40'),
    'rgb': tuple(f'rgb_{i}' for i in range(512)),
}
MODALITIES = tuple(FEATURE_COLUMNS)
LABEL_FILE = 'y.csv'

# URFD annotation value -> class id (the order the IoTDI'22 code also uses).
URFD_LABELS = (-1, 0, 1)
CLASS_NAMES = ('not lying', 'falling', 'lying')
DESCRIPTIONS = (
    ('the person is standing or moving normally',
     'a person goes about daily activities and is not on the floor',
     'someone is upright, walking, sitting or bending',
     'the person is not lying on the ground'),
    ('the person is falling',
     'a person is in the middle of a fall',
     'someone is losing balance and going down',
     'the person is dropping towards the floor'),
    ('the person is lying on the ground',
     'a person lies on the floor',
     'someone is down on the floor',
     'the person is stretched out on the ground'),
)

_MAX_RUN = 1000


def sequence_id(fall: int, run: int) -> int:
  """The sequence id of recording `fall-NN` (fall=1) or `adl-NN` (fall=0)."""
  return int(fall) * _MAX_RUN + int(run)


def sequence_name(seq_id: int) -> str:
  """The URFD name of a sequence id, e.g. 1003 -> 'fall-03', 7 -> 'adl-07'."""
  fall, run = divmod(int(seq_id), _MAX_RUN)
  return f"{'fall' if fall else 'adl'}-{run:02d}"


def _columns(name: str) -> tuple[str, ...]:
  return KEY_COLUMNS + (('label',) if name == 'y' else FEATURE_COLUMNS[name])


def _describe(name: str) -> str:
  if name == 'y':
    return 'fall, run, frame, label (label in -1, 0, 1)'
  feats = FEATURE_COLUMNS[name]
  shown = ', '.join(feats) if len(feats) <= 8 else f'{feats[0]} ... {feats[-1]}'
  return f'fall, run, frame, {len(feats)} {name} values ({shown})'


def _data_lines(path: Path) -> list[int]:
  """1-based line numbers of the data rows (what np.loadtxt parses) of `path`."""
  with open(path) as f:
    return [n for n, line in enumerate(f, 1) if line.split('#', 1)[0].strip()]


def _scan_for_error(path: Path, name: str, cause: Exception) -> ValueError:
  """Finds the first malformed line of `path` (slow path, only after a failure)."""
  cols = _columns(name)
  with open(path) as f:
    for n, raw in enumerate(f, 1):
      line = raw.split('#', 1)[0].strip()
      if not line:
        continue
      fields = line.split(',')
      if len(fields) != len(cols):
        return ValueError(f'{path}, line {n}: expected {len(cols)} comma-separated columns '
                          f'({_describe(name)}), found {len(fields)}')
      for j, s in enumerate(fields):
        try:
          float(s)
        except ValueError:
          return ValueError(f'{path}, line {n}, column {j + 1} ({cols[j]}): {s.strip()!r} is not '
                            f'a number; expected {len(cols)} numbers ({_describe(name)})')
  return ValueError(f'{path}: cannot parse as CSV of {_describe(name)}: {cause}')


def _read_table(path: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads one table; returns (sequence ids int64, frames int64, values float64 [F, k])."""
  cols = _columns(name)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: missing UR Fall file; expected a CSV with one frame per '
                            f'line: {_describe(name)}')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', UserWarning)  # "input contained no data", handled below
      a = np.loadtxt(path, delimiter=',', comments='#', dtype=np.float64, ndmin=2)
  except ValueError as e:
    raise _scan_for_error(path, name, e) from e
  if a.size == 0:
    raise ValueError(f'{path}: no data rows; expected one frame per line: {_describe(name)}')
  if a.shape[1] != len(cols):
    raise ValueError(f'{path}, line {_data_lines(path)[0]}: expected {len(cols)} comma-separated '
                     f'columns ({_describe(name)}), found {a.shape[1]}')

  def fail(row: int, col: int, what: str) -> ValueError:
    line = _data_lines(path)[row]
    return ValueError(f'{path}, line {line}, column {col + 1} ({cols[col]}): '
                      f'{float(a[row, col]):g} {what}')

  bad = ~np.isfinite(a)
  if bad.any():
    r, c = np.argwhere(bad)[0]
    raise fail(r, c, 'is not a finite number')
  keys = a[:, :3]
  bad = keys != np.round(keys)
  if bad.any():
    r, c = np.argwhere(bad)[0]
    raise fail(r, c, 'is not an integer')
  for col, ok, expected in (
      (0, np.isin(keys[:, 0], (0, 1)), 'is not 0 (adl) or 1 (fall)'),
      (1, (keys[:, 1] >= 0) & (keys[:, 1] < _MAX_RUN), f'is not a run number in [0, {_MAX_RUN})'),
      (2, (keys[:, 2] >= 0) & (keys[:, 2] < 2**53), 'is not a frame number >= 0'),
  ):
    if not ok.all():
      raise fail(int(np.argmin(ok)), col, expected)
  if name == 'y':
    ok = np.isin(a[:, 3], URFD_LABELS)
    if not ok.all():
      raise fail(int(np.argmin(ok)), 3, 'is not a UR Fall label: expected -1 (not lying), '
                 '0 (falling) or 1 (lying on the ground)')
  seq = keys[:, 0].astype(np.int64) * _MAX_RUN + keys[:, 1].astype(np.int64)
  frame = keys[:, 2].astype(np.int64)
  return seq, frame, a[:, 3:]


def _sorted(path: Path, seq: np.ndarray, frame: np.ndarray) -> np.ndarray:
  """The row order sorting by (sequence, frame); rejects repeated keys."""
  order = np.lexsort((frame, seq))
  s, f = seq[order], frame[order]
  dup = np.flatnonzero((s[1:] == s[:-1]) & (f[1:] == f[:-1]))
  if dup.size:
    i, j = sorted((int(order[dup[0]]), int(order[dup[0] + 1])))
    lines = _data_lines(path)
    raise ValueError(f'{path}, lines {lines[i]} and {lines[j]}: frame {f[dup[0]]} of '
                     f'{sequence_name(s[dup[0]])} appears twice; expected one row per frame')
  return order


def _check_aligned(y_path: Path, y_seq: np.ndarray, y_frame: np.ndarray,
                   m_path: Path, m_seq: np.ndarray, m_frame: np.ndarray) -> None:
  """Raises unless both files hold the same (sequence, frame) keys (both given sorted)."""
  if len(y_seq) == len(m_seq) and np.array_equal(y_seq, m_seq) and np.array_equal(y_frame, m_frame):
    return
  y_keys = set(zip(y_seq.tolist(), y_frame.tolist()))
  m_keys = set(zip(m_seq.tolist(), m_frame.tolist()))
  missing = sorted(y_keys - m_keys)
  if missing:
    s, f = missing[0]
    raise ValueError(f'{m_path}: no row for frame {f} of {sequence_name(s)} (fall={s // _MAX_RUN}, '
                     f'run={s % _MAX_RUN}), which {y_path} labels; {len(missing)} labelled '
                     f'frame(s) missing in total; every frame needs a row in every modality file')
  s, f = sorted(m_keys - y_keys)[0]
  raise ValueError(f'{m_path}: frame {f} of {sequence_name(s)} (fall={s // _MAX_RUN}, '
                   f'run={s % _MAX_RUN}) has no label row in {y_path}; '
                   f'{len(m_keys - y_keys)} unlabelled frame(s) in total')


def load_urfall(path: str | os.PathLike, window: int = 8, stride: int | None = None,
                modalities: Sequence[str] = MODALITIES) -> MultimodalDataset:
  """Loads a UR Fall directory (layout in the module docstring) as windows.

  Returns modalities of shape [N, window, 3] (acce), [N, window, 8] (depth) and
  [N, window, 512] (rgb), labels 0: not lying, 1: falling, 2: lying (the URFD
  label -1/0/1 of each window's last frame) and sequence_ids =
  `sequence_id(fall, run)` (see `sequence_name`). Windows are ordered by
  sequence id, then time; text_ids = window index mod the paraphrase count.
  Raises FileNotFoundError for a missing file, ValueError for malformed data.
  """
  if isinstance(modalities, str):
    modalities = (modalities,)
  modalities = tuple(modalities)
  unknown = [m for m in modalities if m not in FEATURE_COLUMNS]
  if not modalities or unknown or len(set(modalities)) != len(modalities):
    raise ValueError(f'modalities must be distinct names from {MODALITIES}, got {modalities}')
  stride = window if stride is None else stride
  for arg, v in (('window', window), ('stride', stride)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f'{arg} must be a positive integer, got {v!r}')
  root = Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f'{root}: not a directory; expected a UR Fall directory holding '
                            f'{LABEL_FILE} and ' + ', '.join(f'{m}.csv' for m in modalities))

  y_path = root / LABEL_FILE
  y_seq, y_frame, y_val = _read_table(y_path, 'y')
  order = _sorted(y_path, y_seq, y_frame)
  seq, frame, raw_label = y_seq[order], y_frame[order], y_val[order, 0]
  feats = {}
  for m in modalities:
    m_path = root / f'{m}.csv'
    m_seq, m_frame, m_val = _read_table(m_path, m)
    m_order = _sorted(m_path, m_seq, m_frame)
    _check_aligned(y_path, seq, frame, m_path, m_seq[m_order], m_frame[m_order])
    feats[m] = m_val[m_order].astype(np.float32)

  # Window start rows: every `stride` rows within each sequence, full windows only.
  bounds = np.flatnonzero(np.diff(seq)) + 1
  starts = [np.arange(b, e - window + 1, stride)
            for b, e in zip(np.r_[0, bounds], np.r_[bounds, len(seq)])]
  starts = np.concatenate(starts).astype(np.int64)
  if not starts.size:
    raise ValueError(f'{root}: no recording has at least window={window} frames; the longest '
                     f'has {np.diff(np.r_[0, bounds, len(seq)]).max()}')
  idx = starts[:, None] + np.arange(window)[None, :]

  labels = np.searchsorted(np.asarray(URFD_LABELS), raw_label[idx[:, -1]]).astype(np.int32)
  n_para = np.array([len(d) for d in DESCRIPTIONS])
  text_ids = (np.arange(len(starts)) % n_para[labels]).astype(np.int32)
  return MultimodalDataset(
      modalities={m: x[idx] for m, x in feats.items()},
      labels=labels,
      sequence_ids=seq[starts].astype(np.int64),
      class_names=CLASS_NAMES,
      descriptions=DESCRIPTIONS,
      text_ids=text_ids,
  )


def write_urfall(path: str | os.PathLike, fall: np.ndarray, run: np.ndarray, frame: np.ndarray,
                 labels: np.ndarray, modalities: Mapping[str, np.ndarray]) -> None:
  """Writes per-frame arrays in the layout `load_urfall` reads.

  fall, run, frame, labels: [F] integers (labels the raw URFD -1/0/1);
  modalities: name ('acce', 'depth', 'rgb') -> [F, 3 / 8 / 512] values, stored
  as float32 with enough digits to read back exactly. Creates `path`.
  """
  keys = [np.asarray(v) for v in (fall, run, frame, labels)]
  n = len(keys[0])
  for name, v in zip(KEY_COLUMNS + ('labels',), keys):
    if v.shape != (n,) or not np.array_equal(v, np.round(v)):
      raise ValueError(f'{name} must be a 1-d array of {n} integers, got shape {v.shape}')
  if not np.isin(keys[3], URFD_LABELS).all():
    raise ValueError(f'labels must be URFD labels in {URFD_LABELS}')
  for name, x in modalities.items():
    if name not in FEATURE_COLUMNS:
      raise ValueError(f'unknown modality {name!r}; expected one of {MODALITIES}')
    if np.shape(x) != (n, len(FEATURE_COLUMNS[name])):
      raise ValueError(f'{name} has shape {np.shape(x)}, '
                       f'expected ({n}, {len(FEATURE_COLUMNS[name])})')
  root = Path(path)
  root.mkdir(parents=True, exist_ok=True)
  key_block = np.stack(keys[:3], axis=1).astype(np.float64)  # integers, exact in float64
  tables = {'y': (keys[3].astype(np.float64)[:, None], '%d')}
  # '%.9g' of a float32 value reads back as exactly that float32.
  tables.update({m: (np.asarray(x, dtype=np.float32).astype(np.float64), '%.9g')
                 for m, x in modalities.items()})
  for name, (vals, fmt) in tables.items():
    file = root / (LABEL_FILE if name == 'y' else f'{name}.csv')
    np.savetxt(file, np.hstack([key_block, vals]), fmt=['%d'] * 3 + [fmt] * vals.shape[1],
               delimiter=',', header=','.join(_columns(name)), comments='# ')
