"""The dataset a config names: `data.name` -> a `MultimodalDataset`.

Sources (`data.name`):
  embedded  the shipped activity dataset (no files needed).
  urfall    UR Fall Detection feature tables under `data.path` (ml_ecs/data/urfall.py).
  npz       one numpy .npz file (or a directory holding exactly one), see `load_npz`.
  hf        a Hugging Face `datasets` dataset on disk: a `save_to_disk` directory or
            parquet file(s), see `load_hf`. Needs `pip install 'ml-ecs[data]'`.
  tfds      a prepared TensorFlow Datasets directory in array_record (or parquet) format,
            read without TensorFlow, see `load_tfds`. Needs `pip install 'ml-ecs[data]'`.

The fields these read (`data_source_fields()` lists them with defaults; `check_data_config`
validates them), all read with defaults so a config without them still works:
  data.path     file or directory of the dataset ('' for embedded).
  data.split    split to read for hf (DatasetDict / parquet file prefix) and tfds ('train').
  data.columns.modalities  which modalities to read: a sequence (or comma-separated string)
                of entries 'name' (column/feature/`x_<name>` key of that name) or
                'name=column' (modality `name` read from `column`); empty = every
                array-valued column other than the label, sequence-id and text columns.
  data.columns.label        label column ('label'); int, ClassLabel or string.
  data.columns.sequence_id  sequence-id column ('' = none: every sample is its own sequence).
  data.columns.text         text column ('' = none: each class's name is its only description).
  data.class_names          class names for plain-integer labels without names (() = 'class i').

Missing samples. A modality value that is None (hf: a null row) or all NaN (every source)
marks that sample's modality as missing: `MultimodalDataset.present[m][i]` is False, the
stored values are 0, and partitioning masks it out for every node. A row that is only
partly NaN is an error (impute it, or make the whole row NaN to mark it missing). Every
sample needs at least one modality present.

Your own data in memory (no files): build the dataset from numpy arrays and hand it to the
job instead of `data.name` (`ml_ecs.run.trainer.train(cfg, workdir, dataset=ds)`, or
`ml_ecs.core.federation.init(cfg, dataset=ds)`; for another method than ML-ECS pass
`ml_ecs.algorithms.registry.apply_strategy(cfg, 'fedavg')`, as the command line does):

    from ml_ecs.data.loaders import from_arrays
    ds = from_arrays(
        {'accel': accel,            # float [N, 32, 3]; an all-NaN row = missing sample
         'depth': depth},           # float [N, 8]
        labels=y,                   # int [N] in [0, num_classes)
        class_names=('walk', 'fall'),
        sequence_ids=rec_id,        # optional int [N]: windows of one recording share an id
        descriptions=(('a person walks', 'someone is walking'),   # optional paraphrases
                      ('a person falls', 'someone falls down')),
        text_ids=None)              # optional int [N]: which paraphrase is sample i's target

`from_arrays` applies the same checks and missing-sample rules as the file loaders;
`MultimodalDataset(...)` itself (ml_ecs/data/dataset.py) takes the arrays as they are.
`save_npz(ds, path)` writes any dataset in the `npz` format.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from ml_ecs.data.dataset import MultimodalDataset

DATA_SOURCES = ('embedded', 'synthetic', 'urfall', 'npz', 'hf', 'tfds')
FILE_SOURCES = ('urfall', 'npz', 'hf', 'tfds')
COLUMN_FIELDS = ('modalities', 'label', 'sequence_id', 'text')
_DATA_EXTRA = "pip install 'ml-ecs[data]'"


def data_source_fields() -> ml_collections.ConfigDict:
  """The `data` fields that select and read a dataset, with their defaults.

  name: one of DATA_SOURCES. path: file or directory ('' for embedded). split: split name
  for hf/tfds. columns: modalities (entries 'name' or 'name=column'; empty = all array
  columns), label, sequence_id ('' = none), text ('' = none). class_names: names of plain
  integer labels (() = 'class 0', 'class 1', ...). synthetic_recordings / synthetic_windows:
  size of the 'synthetic' source (the embedded data's latent model at any size, drawn from
  data.seed; 0 recordings = enough for data.num_clients, ml_ecs.data.synthetic.recordings_for).
  """
  return ml_collections.ConfigDict({
      'name': 'embedded',
      'path': '',
      'split': 'train',
      'columns': ml_collections.ConfigDict({
          'modalities': (),
          'label': 'label',
          'sequence_id': '',
          'text': '',
      }),
      'class_names': (),
      'synthetic_recordings': 0,
      'synthetic_windows': 10,
  })


def _columns_cfg(cfg: Any) -> Mapping[str, Any]:
  cols = cfg.get('columns', None) or {}
  defaults = data_source_fields().columns
  return {k: (cols.get(k, defaults[k]) if hasattr(cols, 'get') else defaults[k]) for k in COLUMN_FIELDS}


def parse_modality_columns(spec: Any) -> dict[str, str]:
  """'accel,depth=d' or ('accel', 'depth=d') -> {'accel': 'accel', 'depth': 'd'} ({} = all)."""
  if spec is None:
    return {}
  if isinstance(spec, str):
    spec = [s for s in spec.split(',')]
  out: dict[str, str] = {}
  for entry in spec:
    if not isinstance(entry, str):
      raise ValueError(f'data.columns.modalities entries must be strings, got {entry!r}')
    name, _, column = entry.strip().partition('=')
    name, column = name.strip(), column.strip() or name.strip()
    if not name or ('=' in entry and not entry.partition('=')[2].strip()):
      raise ValueError(f"data.columns.modalities entry {entry!r} must be 'name' or 'name=column'")
    if name in out:
      raise ValueError(f'data.columns.modalities names modality {name!r} twice')
    out[name] = column
  return out


def check_data_config(cfg: ml_collections.ConfigDict) -> None:
  """Validates the dataset-source fields of the `data` config; raises ValueError naming the field."""
  name = cfg.get('name', 'embedded')
  if name not in DATA_SOURCES:
    raise ValueError(f'data.name must be one of {DATA_SOURCES}, got {name!r}')
  path = cfg.get('path', '')
  if not isinstance(path, (str, os.PathLike)):
    raise ValueError(f'data.path must be a string, got {path!r}')
  if name in FILE_SOURCES and not str(path):
    raise ValueError(f'data.path must name the dataset file or directory for data.name={name!r}')
  split = cfg.get('split', 'train')
  if not isinstance(split, str) or not split:
    raise ValueError(f'data.split must be a non-empty string, got {split!r}')
  cols = cfg.get('columns', None)
  if cols is not None:
    if not hasattr(cols, 'keys'):
      raise ValueError(f'data.columns must be a ConfigDict with fields {COLUMN_FIELDS}, got {cols!r}')
    unknown = set(cols.keys()) - set(COLUMN_FIELDS)
    if unknown:
      raise ValueError(f'data.columns has unknown fields {sorted(unknown)}; allowed: {COLUMN_FIELDS}')
  c = _columns_cfg(cfg)
  mods = parse_modality_columns(c['modalities'])
  if not isinstance(c['label'], str) or not c['label']:
    raise ValueError(f"data.columns.label must be a non-empty column name, got {c['label']!r}")
  for f in ('sequence_id', 'text'):
    if not isinstance(c[f], str):
      raise ValueError(f'data.columns.{f} must be a column name or empty, got {c[f]!r}')
  special = [c['label']] + [c[f] for f in ('sequence_id', 'text') if c[f]]
  clash = set(mods.values()) & set(special)
  if clash:
    raise ValueError(f'data.columns.modalities reads columns {sorted(clash)} that are also the '
                     'label/sequence_id/text column')
  for f in ('synthetic_recordings', 'synthetic_windows'):
    v = cfg.get(f, data_source_fields()[f])
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if f == 'synthetic_recordings' else 1):
      raise ValueError(f"data.{f} must be an integer >= {0 if f == 'synthetic_recordings' else 1}, got {v!r}")
  names = cfg.get('class_names', ())
  if isinstance(names, str) or not all(isinstance(n, str) and n for n in (names or ())):
    raise ValueError(f'data.class_names must be a sequence of non-empty strings, got {names!r}')


def load_dataset(cfg: ml_collections.ConfigDict) -> MultimodalDataset:
  """The dataset named by `data.name` (cfg is the `data` config); see the module docstring."""
  check_data_config(cfg)
  name = cfg.get('name', 'embedded')
  if name == 'embedded':
    from ml_ecs.data.embedded import load_default
    return load_default()
  if name == 'synthetic':
    from ml_ecs.data import synthetic
    n = cfg.get('synthetic_recordings', 0) or synthetic.recordings_for(
        cfg.get('num_clients', 8), cfg.get('public_fraction', 0.2), cfg.get('max_public_sequences', 0))
    return synthetic.generate_chunked(n, cfg.get('synthetic_windows', 10), seed=cfg.get('seed', 0))
  if name == 'urfall':
    from ml_ecs.data.urfall import load_urfall
    return load_urfall(cfg.path)
  c = _columns_cfg(cfg)
  class_names = tuple(cfg.get('class_names', ()) or ())
  if name == 'npz':
    return load_npz(cfg.path, modalities=c['modalities'], class_names=class_names)
  if name == 'hf':
    return load_hf(cfg.path, split=cfg.get('split', 'train'), modalities=c['modalities'],
                   label=c['label'], sequence_id=c['sequence_id'], text=c['text'], class_names=class_names)
  return load_tfds(cfg.path, split=cfg.get('split', 'train'), modalities=c['modalities'],
                   label=c['label'], sequence_id=c['sequence_id'], text=c['text'], class_names=class_names)


# ----------------------------------------------------------------------------- common checks

def _missing_rows(x: np.ndarray, where: str, present: np.ndarray | None = None) -> np.ndarray:
  """bool [N] presence from all-NaN rows (and an explicit `present`); partial NaN is an error."""
  flat = x.reshape(len(x), -1)
  nan = np.isnan(flat)
  all_nan = nan.all(1) if flat.shape[1] else np.zeros(len(x), bool)
  present = np.ones(len(x), bool) if present is None else present.copy()
  partial = np.flatnonzero(nan.any(1) & ~all_nan & present)
  if partial.size:
    r = partial[0]
    raise ValueError(f'{where} row {r} has {int(nan[r].sum())} NaN of {flat.shape[1]} values: a '
                     'missing sample must be entirely NaN (or None), a present one have no NaN')
  return present & ~all_nan


# Larger input values are refused: they are not features but overflow (float32 ends at 3.4e38) or
# unit errors, and a single such row makes its client diverge without naming why.
MAX_ABS_VALUE = 1e30


def _check_magnitudes(x: np.ndarray, where: str) -> None:
  """Raises ValueError naming the rows holding +-Inf or |value| >= MAX_ABS_VALUE (NaN is the missing-sample rule)."""
  if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
    return
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  with np.errstate(invalid='ignore'):
    bad = np.isinf(flat) | (np.abs(flat) >= MAX_ABS_VALUE)
  rows = np.flatnonzero(bad.any(1))
  if rows.size:
    r = rows[0]
    first = flat[r][bad[r]][0]
    shown = ', '.join(str(int(i)) for i in rows[:10]) + (f', ... ({rows.size} rows)' if rows.size > 10 else '')
    raise ValueError(f'{where} has non-finite or absurd values (|x| >= {MAX_ABS_VALUE:g}) in rows {shown} '
                     f'(row {r}: {float(first)!r}); fix or drop those rows (all-NaN marks a missing sample)')


def from_arrays(modalities: Mapping[str, Any], labels: Any, class_names: Sequence[str],
                sequence_ids: Any = None, descriptions: Sequence[Sequence[str]] | None = None,
                text_ids: Any = None, present: Mapping[str, Any] | None = None,
                source: str = 'from_arrays', origins: Mapping[str, str] | None = None) -> MultimodalDataset:
  """A checked `MultimodalDataset` from numpy-like arrays.

  modalities: name -> float [N, *shape]; all-NaN rows are missing samples (stored as 0).
  labels: int [N] in [0, len(class_names)). sequence_ids: int [N] (None = one per sample).
  descriptions: paraphrases per class (None = the class name). text_ids: int [N] indexing
  the paraphrases of each sample's class (None = 0). present: optional name -> bool [N]
  (False = missing), combined with the NaN rule. `source` prefixes error messages;
  `origins` (modality -> e.g. "column 'acc'") names where each modality was read from.
  """
  class_names = tuple(str(c) for c in class_names)
  if not class_names:
    raise ValueError(f'{source}: no class names')
  if len(set(class_names)) != len(class_names):
    raise ValueError(f'{source}: class names are not unique: {list(class_names)}')
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'{source}: labels have shape {labels.shape}, expected (N,)')
  n = len(labels)
  if n == 0:
    raise ValueError(f'{source}: the dataset has no samples')
  if not np.issubdtype(labels.dtype, np.integer):
    if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
      labels = labels.astype(np.int64)
    else:
      raise ValueError(f'{source}: labels have dtype {labels.dtype}, expected integers')
  bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
  if bad.size:
    raise ValueError(f'{source}: label {labels[bad[0]]} at row {bad[0]} is outside [0, {len(class_names)}) '
                     f'({len(class_names)} classes: {list(class_names)})')
  if not modalities:
    raise ValueError(f'{source}: no modality arrays')
  mods: dict[str, np.ndarray] = {}
  pres: dict[str, np.ndarray] = {}
  for name, x in modalities.items():
    x = np.asarray(x)
    where = f'{source}: ' + (origins or {}).get(name, f'modality {name!r}')
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
      raise ValueError(f'{where} has dtype {x.dtype}, expected a numeric array [N, *shape]')
    if x.ndim < 1 or x.shape[0] != n:
      raise ValueError(f'{where} has shape {x.shape}, expected ({n}, ...) (one row per label)')
    named = f'{source}: modality {name!r}' + (f' ({origins[name]})' if origins and name in origins else '')
    if x.ndim > 1 and 0 in x.shape[1:]:
      raise ValueError(f'{named} has shape {x.shape}: each row has no values (a modality needs at least one '
                       'feature per sample; drop the modality)')
    _check_magnitudes(x, named)
    x = x.astype(np.float32)
    p = None
    if present is not None and name in present:
      p = np.asarray(present[name])
      if p.shape != (n,):
        raise ValueError(f'{where}: presence mask has shape {p.shape}, expected ({n},)')
      p = p.astype(bool)
    p = _missing_rows(x, where, p)
    x = np.where(p.reshape((n,) + (1,) * (x.ndim - 1)), np.nan_to_num(x, nan=0.0), 0.0).astype(np.float32)
    mods[name], pres[name] = x, p
  if present is not None:
    unknown = set(present) - set(mods)
    if unknown:
      raise ValueError(f'{source}: presence masks for unknown modalities {sorted(unknown)}')
  none = np.flatnonzero(~np.stack(list(pres.values()), 1).any(1))
  if none.size:
    raise ValueError(f'{source}: row {none[0]} has every modality missing ({none.size} such rows); '
                     'drop those samples')
  if sequence_ids is None:
    sequence_ids = np.arange(n, dtype=np.int64)
  sequence_ids = np.asarray(sequence_ids)
  if sequence_ids.shape != (n,) or not np.issubdtype(sequence_ids.dtype, np.integer):
    raise ValueError(f'{source}: sequence ids have dtype {sequence_ids.dtype} and shape '
                     f'{sequence_ids.shape}, expected integers ({n},)')
  if descriptions is None:
    descriptions = tuple((c,) for c in class_names)
  descriptions = tuple(tuple(str(t) for t in d) for d in descriptions)
  if len(descriptions) != len(class_names):
    raise ValueError(f'{source}: {len(descriptions)} description lists for {len(class_names)} classes')
  empty = [class_names[c] for c, d in enumerate(descriptions) if not d or not all(d)]
  if empty:
    raise ValueError(f'{source}: classes {empty} have no (or an empty) description')
  text_ids = np.zeros(n, np.int32) if text_ids is None else np.asarray(text_ids)
  if text_ids.shape != (n,) or not np.issubdtype(text_ids.dtype, np.integer):
    raise ValueError(f'{source}: text ids have dtype {text_ids.dtype} and shape {text_ids.shape}, '
                     f'expected integers ({n},)')
  n_para = np.array([len(d) for d in descriptions])
  bad = np.flatnonzero((text_ids < 0) | (text_ids >= n_para[labels]))
  if bad.size:
    r = bad[0]
    raise ValueError(f'{source}: text id {text_ids[r]} at row {r} is outside the {n_para[labels[r]]} '
                     f'descriptions of its class {class_names[labels[r]]!r}')
  all_present = all(p.all() for p in pres.values())
  return MultimodalDataset(mods, labels.astype(np.int32), sequence_ids.astype(np.int64), class_names,
                           descriptions, text_ids.astype(np.int32), None if all_present else pres)


def _texts_to_descriptions(texts: Sequence[str], labels: np.ndarray, num_classes: int,
                           class_names: Sequence[str], where: str):
  """Distinct texts per class (first-appearance order) -> (descriptions, text_ids)."""
  paras: list[dict[str, int]] = [{} for _ in range(num_classes)]
  text_ids = np.empty(len(labels), np.int32)
  for i, (t, c) in enumerate(zip(texts, labels)):
    if not isinstance(t, str) or not t.strip():
      raise ValueError(f'{where} row {i} is {t!r}, expected a non-empty string')
    text_ids[i] = paras[c].setdefault(t, len(paras[c]))
  descriptions = tuple(tuple(p) if p else (class_names[c],) for c, p in enumerate(paras))
  return descriptions, text_ids


def _select(available: Sequence[str], spec: Any, exclude: Sequence[str], default: Sequence[str],
            where: str, what: str = 'columns') -> dict[str, str]:
  """modality name -> column, from the config spec or (empty spec) the `default` columns."""
  mods = parse_modality_columns(spec)
  if not mods:
    mods = {c: c for c in default if c not in exclude}
    if not mods:
      raise ValueError(f'{where} has no array-valued {what} to use as modalities; {what} are {list(available)}')
  missing = [c for c in mods.values() if c not in available]
  if missing:
    raise ValueError(f'modality {what} {missing} not found in {where}; {what} are {list(available)}')
  return mods


def _shape_of(value: Any) -> str:
  """Shape of a nested list for error messages ('ragged' when it has none)."""
  try:
    return str(np.asarray(value, dtype=np.float64).shape)
  except (ValueError, TypeError):
    return 'ragged'


# ----------------------------------------------------------------------------- npz

def save_npz(ds: MultimodalDataset, path: str | os.PathLike) -> None:
  """Writes `ds` in the `npz` source format (see `load_npz`)."""
  width = max(len(d) for d in ds.descriptions)
  desc = np.array([list(d) + [''] * (width - len(d)) for d in ds.descriptions], dtype=str)
  arrays = {f'x_{k}': v for k, v in ds.modalities.items()}
  if ds.present is not None:
    arrays.update({f'present_{k}': v for k, v in ds.present.items()})
  np.savez_compressed(path, labels=ds.labels, sequence_ids=ds.sequence_ids, text_ids=ds.text_ids,
                      class_names=np.array(ds.class_names, dtype=str), descriptions=desc, **arrays)


def load_npz(path: str | os.PathLike, modalities: Any = (), class_names: Sequence[str] = ()) -> MultimodalDataset:
  """Reads one .npz file (or a directory holding exactly one).

  Keys: `x_<modality>` float [N, *shape] per modality (all-NaN row = missing sample);
  `labels` int [N]; `class_names` str [C] (optional when `class_names`, i.e. data.class_names,
  gives them; given both, they must agree); optional `descriptions` str [C, P] (paraphrases
  per class, '' pads classes with fewer; default: the class name), `sequence_ids` int [N]
  (default: one sequence per sample), `text_ids` int [N] (default 0), `present_<modality>`
  bool [N] (False = missing, in addition to the NaN rule). `modalities` selects modalities
  by name ('name' or 'name=other_name' reads `x_<other_name>` as `name`; empty = all).
  This is what `save_npz` writes; the embedded activity_default.npz lacks only the names.
  """
  path = Path(path)
  if path.is_dir():
    files = sorted(path.glob('*.npz'))
    if len(files) != 1:
      raise ValueError(f'data.path {path} is a directory with {len(files)} .npz files '
                       f'({[f.name for f in files]}); expected exactly one')
    path = files[0]
  if not path.is_file():
    raise FileNotFoundError(f'npz dataset {path} does not exist')
  try:
    z = np.load(path, allow_pickle=False)
    arrays = {k: z[k] for k in z.files}
  except (ValueError, OSError) as e:
    raise ValueError(f'{path} is not a readable .npz file of plain arrays: {e}') from e
  keys = sorted(arrays)
  given = [str(c) for c in class_names]
  for k in ('labels',) + (() if given else ('class_names',)):
    if k not in arrays:
      hint = ' (or give data.class_names)' if k == 'class_names' else ''
      raise ValueError(f'{path} has no {k!r} array{hint}; keys are {keys} (expected x_<modality>, labels, '
                       'class_names, optional descriptions, sequence_ids, text_ids, present_<modality>)')
  names = [k[2:] for k in keys if k.startswith('x_')]
  mods = _select(names, modalities, (), names, str(path), what='modalities (x_<name> keys)')
  if 'class_names' in arrays:
    names_arr = arrays['class_names']
    if names_arr.ndim != 1 or names_arr.dtype.kind not in 'US':
      raise ValueError(f"{path}: 'class_names' has dtype {names_arr.dtype} and shape {names_arr.shape}, "
                       'expected strings [C]')
    stored = [str(c) for c in names_arr]
    if given and given != stored:
      raise ValueError(f'data.class_names {given} differ from the class_names array of {path} {stored}; '
                       'give one of them, or the same')
    class_names = stored
  else:
    class_names = given
  descriptions = None
  if 'descriptions' in arrays:
    d = arrays['descriptions']
    if d.ndim != 2 or d.dtype.kind not in 'US' or len(d) != len(class_names):
      raise ValueError(f"{path}: 'descriptions' has dtype {d.dtype} and shape {d.shape}, expected "
                       f"strings [{len(class_names)}, P] ('' pads)")
    descriptions = [[str(t) for t in row if str(t)] for row in d]
  present = {m: arrays[f'present_{c}'] for m, c in mods.items() if f'present_{c}' in arrays}
  return from_arrays({m: arrays[f'x_{c}'] for m, c in mods.items()}, arrays['labels'], class_names,
                     arrays.get('sequence_ids'), descriptions, arrays.get('text_ids'),
                     present or None, source=str(path), origins={m: f'x_{c}' for m, c in mods.items()})


# ----------------------------------------------------------------------------- hf

def _import(module: str, source: str):
  import importlib
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"data.name={source!r} needs the {module} package: {_DATA_EXTRA}") from e


def _parquet_files(path: Path, split: str) -> list[Path]:
  if path.is_file():
    return [path]
  files = sorted(path.rglob('*.parquet'))
  if not files:
    raise ValueError(f'{path} holds no .parquet files and is not a datasets save_to_disk directory '
                     '(no dataset_info.json, state.json or dataset_dict.json)')
  chosen = [f for f in files if f.parent.name == split or f.name.startswith((f'{split}-', f'{split}.',
                                                                            f'{split}_'))]
  return chosen or files


def _read_hf(path: Path, split: str):
  """(pyarrow Table, datasets Features, description of where) for a hf source path."""
  datasets = _import('datasets', 'hf')
  if not path.exists():
    raise FileNotFoundError(f'hf dataset {path} does not exist')
  if path.is_dir() and (path / 'dataset_dict.json').exists():
    dd = datasets.load_from_disk(str(path))
    if split not in dd:
      raise ValueError(f'split {split!r} not found in {path}; splits are {list(dd)} (set data.split)')
    ds, where = dd[split], f'{path} (split {split!r})'
  elif path.is_dir() and (path / 'state.json').exists():
    ds, where = datasets.load_from_disk(str(path)), str(path)
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    files = _parquet_files(path, split)
    try:
      tables = [pq.read_table(f) for f in files]
      table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, OSError) as e:
      raise ValueError(f'cannot read parquet {[str(f) for f in files]}: {e}') from e
    where = str(files[0]) if len(files) == 1 else f'{path} ({len(files)} parquet files)'
    try:
      features = datasets.Features.from_arrow_schema(table.schema)
    except Exception:  # pylint: disable=broad-except  # plain parquet without HF metadata
      features = None
    return table, features, where
  return ds.with_format('arrow')[:], ds.features, where


def _is_list(t) -> bool:
  import pyarrow as pa
  return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _unwrap(t):
  import pyarrow as pa
  return t.storage_type if isinstance(t, pa.ExtensionType) else t


def _arrow_column(arr, where: str) -> tuple[np.ndarray, np.ndarray]:
  """A list-valued arrow column -> (float32 [N, *shape] with NaN rows where null, bool present)."""
  import pyarrow as pa
  if isinstance(arr, pa.ChunkedArray):
    arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
  if isinstance(arr, pa.ExtensionArray):
    arr = arr.storage
  n = len(arr)
  present = ~arr.is_null().to_numpy(zero_copy_only=False)
  rows = np.flatnonzero(present)
  if not rows.size:
    raise ValueError(f'{where} is missing (None) in every row')
  cur = arr.filter(pa.array(present))
  dims: list[int] = []
  while _is_list(cur.type):
    if cur.null_count:
      item = np.flatnonzero(cur.is_null().to_numpy(zero_copy_only=False))[0]
      r = rows[item // max(int(np.prod(dims)), 1)]
      raise ValueError(f'{where} row {r} holds a None inside its array: a missing sample must be None '
                       'as a whole')
    if pa.types.is_fixed_size_list(cur.type):
      lengths = np.full(len(cur), cur.type.list_size)
    else:
      lengths = cur.value_lengths().to_numpy(zero_copy_only=False)
    d = int(lengths[0])
    bad = np.flatnonzero(lengths != d)
    if bad.size:
      r = rows[bad[0] // max(int(np.prod(dims)), 1)]
      expected = _shape_of(arr[int(rows[0])].as_py())
      raise ValueError(f'{where} row {r} has shape {_shape_of(arr[int(r)].as_py())}, expected {expected} '
                       f'(the shape of row {rows[0]})')
    dims.append(d)
    cur = cur.flatten()
  if not (pa.types.is_integer(cur.type) or pa.types.is_floating(cur.type) or pa.types.is_boolean(cur.type)):
    raise ValueError(f'{where} holds {cur.type} values, expected numbers (an array per row)')
  values = cur.to_numpy(zero_copy_only=False).astype(np.float32)  # nulls inside -> NaN
  out = np.full((n, *dims), np.nan, np.float32)
  out[rows] = values.reshape((len(rows), *dims))
  return out, present


def load_hf(path: str | os.PathLike, split: str = 'train', modalities: Any = (), label: str = 'label',
            sequence_id: str = '', text: str = '', class_names: Sequence[str] = ()) -> MultimodalDataset:
  """Reads a Hugging Face `datasets` dataset on disk (needs `pip install 'ml-ecs[data]'`).

  path: a `Dataset.save_to_disk` directory, a `DatasetDict.save_to_disk` directory (the
  `split` is read), a parquet file, or a directory of parquet files (those under a folder
  named `split` or named `<split>-*`/`<split>.*`/`<split>_*`, else all of them).
  Columns: one per modality, each row a fixed-shape numeric array (list, nested lists or
  ArrayXD; None or an all-NaN row = that sample's modality is missing); `label` int,
  ClassLabel (its names become the class names) or string (sorted distinct values become
  the class names); optional `sequence_id` int column; optional `text` column, whose
  distinct texts per class become that class's paraphrases (text_ids index them); without
  it each class's name is its only description. `class_names` names plain int labels.
  """
  path = Path(path)
  table, features, where = _read_hf(path, split)
  columns = list(table.column_names)
  if label not in columns:
    raise ValueError(f'labels column {label!r} not found in {where}; columns are {columns} '
                     '(set data.columns.label)')
  for field, col in (('sequence_id', sequence_id), ('text', text)):
    if col and col not in columns:
      raise ValueError(f'{field} column {col!r} not found in {where}; columns are {columns} '
                       f'(set data.columns.{field})')
  array_cols = [c for c in columns if _is_list(_unwrap(table.schema.field(c).type))]
  mods = _select(columns, modalities, [label, sequence_id, text], array_cols, where)
  arrays, present = {}, {}
  for m, c in mods.items():
    arrays[m], present[m] = _arrow_column(table.column(c), f'{where}: column {c!r}')
  labels, class_names = _hf_labels(table, features, label, class_names, where)
  seq = None
  if sequence_id:
    seq = _int_column(table.column(sequence_id), f'{where}: sequence_id column {sequence_id!r}')
  descriptions = text_ids = None
  if text:
    col = table.column(text)
    import pyarrow as pa
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
      raise ValueError(f'{where}: text column {text!r} has type {col.type}, expected strings')
    descriptions, text_ids = _texts_to_descriptions(col.to_pylist(), labels, len(class_names), class_names,
                                                    f'{where}: text column {text!r}')
  return from_arrays(arrays, labels, class_names, seq, descriptions, text_ids, present, source=where,
                     origins={m: f'column {c!r}' for m, c in mods.items()})


def _int_column(col, where: str) -> np.ndarray:
  import pyarrow as pa
  if col.null_count:
    raise ValueError(f'{where} has {col.null_count} None values')
  if not pa.types.is_integer(_unwrap(col.type)):
    raise ValueError(f'{where} has type {col.type}, expected integers')
  return np.asarray(col.to_numpy(), np.int64)


def _hf_labels(table, features, label: str, class_names: Sequence[str], where: str):
  """(int labels, class names) from an int, ClassLabel or string column."""
  import pyarrow as pa
  col = table.column(label)
  lwhere = f'{where}: labels column {label!r}'
  if col.null_count:
    raise ValueError(f'{lwhere} has {col.null_count} None values')
  feature = features.get(label) if features is not None else None
  if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
    values = np.asarray(col.to_pylist(), dtype=object)
    names = tuple(sorted(set(values)))
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[v] for v in values], np.int64), names
  labels = _int_column(col, lwhere)
  if feature is not None and type(feature).__name__ == 'ClassLabel':
    names = tuple(feature.names)
    if class_names and tuple(class_names) != names:
      raise ValueError(f'data.class_names {list(class_names)} differ from the ClassLabel names {list(names)} '
                       f'of {lwhere}')
    return labels, names
  if class_names:
    return labels, tuple(class_names)
  return labels, tuple(f'class {i}' for i in range(int(labels.max()) + 1 if len(labels) else 0))


# ----------------------------------------------------------------------------- tfds

_TFRECORD_NEEDS_TF = (
    'is stored as {fmt}; TFDS reads {fmt} only through TensorFlow (tf.data), which ml-ecs does not '
    'install. Re-prepare it as array_record, which TFDS reads with numpy only: '
    "builder.download_and_prepare(file_format='array_record') (or `tfds build "
    "--file_format=array_record`), or convert it once where TensorFlow is installed, e.g. "
    'to a Hugging Face dataset (data.name=hf) or an .npz file (data.name=npz).')


def _tfds_dir(path: Path) -> Path:
  """The version directory (holding dataset_info.json) at or below `path` (two levels)."""
  if (path / 'dataset_info.json').exists():
    return path
  found = sorted(set(path.glob('*/dataset_info.json')) | set(path.glob('*/*/dataset_info.json')))
  if len(found) == 1:
    return found[0].parent
  if not found:
    raise ValueError(f'{path} is not a prepared TFDS dataset directory: no dataset_info.json in it or '
                     'below it (expected DATA_DIR/<name>/<version>/)')
  raise ValueError(f'{path} holds several prepared TFDS datasets {[str(f.parent) for f in found]}; '
                   'set data.path to one of them')


def load_tfds(path: str | os.PathLike, split: str = 'train', modalities: Any = (), label: str = 'label',
              sequence_id: str = '', text: str = '', class_names: Sequence[str] = ()) -> MultimodalDataset:
  """Reads a prepared TFDS dataset directory without TensorFlow (needs `pip install 'ml-ecs[data]'`).

  path: the `<data_dir>/<name>/<version>` directory (or a folder with exactly one such
  directory below it), opened with `tfds.builder_from_directory` and read through
  `builder.as_data_source(split)`: this needs the array_record (or parquet) file format.
  Datasets prepared as tfrecord (TFDS's default) can only be read with TensorFlow; the
  error says how to re-prepare them. Features: one `Tensor` per modality (float; an
  all-NaN example = missing), `label` a ClassLabel (names become the class names) or an
  integer, optional integer `sequence_id`, optional `Text` feature `text` (paraphrases as
  in `load_hf`). Examples are read in stored order (shuffled at preparation time unless
  the builder set disable_shuffling).
  """
  tfds = _import('tensorflow_datasets', 'tfds')
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f'tfds dataset {path} does not exist')
  vdir = _tfds_dir(path)
  builder = tfds.builder_from_directory(str(vdir))
  info = builder.info
  splits = list(info.splits.keys())
  if split not in splits:
    raise ValueError(f'split {split!r} not found in {vdir}; splits are {splits} (set data.split)')
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:
    fmt = getattr(info.file_format, 'value', info.file_format)
    raise ValueError(f'TFDS dataset {vdir} ' + _TFRECORD_NEEDS_TF.format(fmt=fmt)) from e
  features = info.features
  names = list(features.keys())
  if label not in names:
    raise ValueError(f'labels feature {label!r} not found in {vdir}; features are {names} (set data.columns.label)')
  for field, col in (('sequence_id', sequence_id), ('text', text)):
    if col and col not in names:
      raise ValueError(f'{field} feature {col!r} not found in {vdir}; features are {names} '
                       f'(set data.columns.{field})')
  tensor_feats = [k for k in names if len(features[k].shape or ()) >= 1
                  and np.issubdtype(np.dtype(features[k].np_dtype), np.number)]
  mods = _select(names, modalities, [label, sequence_id, text], tensor_feats, str(vdir), what='features')
  n = len(source)
  if n == 0:
    raise ValueError(f'split {split!r} of {vdir} has no examples')
  records = [ex for start in range(0, n, 1024)
             for ex in source.__getitems__(list(range(start, min(start + 1024, n))))]
  where = f'{vdir} (split {split!r})'
  arrays = {m: _stack_rows([r[c] for r in records], f'{where}: feature {c!r}') for m, c in mods.items()}
  labels = _stack_rows([r[label] for r in records], f'{where}: labels feature {label!r}')
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{where}: labels feature {label!r} has dtype {labels.dtype} and shape '
                     f'{labels.shape[1:]} per example, expected a scalar integer')
  feat = features[label]
  if type(feat).__name__ == 'ClassLabel':
    names_l = tuple(feat.names)
    if class_names and tuple(class_names) != names_l:
      raise ValueError(f'data.class_names {list(class_names)} differ from the ClassLabel names '
                       f'{list(names_l)} of {where}')
    class_names = names_l
  elif not class_names:
    class_names = tuple(f'class {i}' for i in range(int(labels.max()) + 1))
  seq = None
  if sequence_id:
    seq = _stack_rows([r[sequence_id] for r in records], f'{where}: sequence_id feature {sequence_id!r}')
  descriptions = text_ids = None
  if text:
    raw = [r[text] for r in records]
    if not all(isinstance(t, (bytes, str)) for t in raw):
      raise ValueError(f'{where}: text feature {text!r} is not a Text feature (got {type(raw[0]).__name__})')
    texts = [t.decode('utf-8') if isinstance(t, bytes) else t for t in raw]
    descriptions, text_ids = _texts_to_descriptions(texts, labels, len(class_names), class_names,
                                                    f'{where}: text feature {text!r}')
  return from_arrays(arrays, labels, class_names, seq, descriptions, text_ids, source=where,
                     origins={m: f'feature {c!r}' for m, c in mods.items()})


def _stack_rows(rows: Sequence[Any], where: str) -> np.ndarray:
  """Stacks per-example arrays, naming the first example whose shape differs."""
  arrs = [np.asarray(r) for r in rows]
  shape = arrs[0].shape
  for i, a in enumerate(arrs):
    if a.shape != shape:
      raise ValueError(f'{where} row {i} has shape {a.shape}, expected {shape} (the shape of row 0)')
  return np.stack(arrs)
