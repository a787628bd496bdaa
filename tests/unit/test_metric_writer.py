"""The TensorBoard writer, read back with TensorBoard's own event reader."""
import math

import numpy as np
import pytest

from ml_ecs.run.metric_writer import MetricWriter, flatten_row

ROWS = [
    {'round': 0, 'server/rougeLsum': 0.25, 'client/rougeLsum_mean': 0.3,
     'client/rougeLsum': {'0': 0.1, '1': 0.5}, 'samples/server_prediction': 'walking slowly',
     'time/eval_s': 1.5},
    # A training-only row (no evaluation keys), numpy scalars, a NaN and a bool.
    {'round': 1, 'client/private_lm': np.float32(2.5), 'server/lm': float('nan'),
     'comm/bytes_up': np.int64(41600), 'mma/excluded': 3, 'flag': True},
    {'round': 3, 'server/rougeLsum': 0.75, 'client/rougeLsum_mean': 0.4,
     'client/rougeLsum': {'0': 0.2, '1': 0.6}, 'client/private_lm': 1.25, 'server/lm': 0.5},
]


def _expected() -> dict[str, list[tuple[int, float]]]:
  out: dict[str, list[tuple[int, float]]] = {}
  for row in ROWS:
    scalars, _ = flatten_row({k: v for k, v in row.items() if k != 'round'})
    for tag, v in scalars.items():
      out.setdefault(tag, []).append((row['round'], v))
  return out


def test_flatten_row():
  scalars, texts = flatten_row({'a': 1, 'b': {'0': 0.5, '1': float('inf')}, 'c': 'x', 'd': None,
                                'e': float('nan'), 'f': np.float32(0.25), 'g': [1, 2]})
  assert scalars == {'a': 1.0, 'b/0': 0.5, 'f': 0.25}
  assert texts == {'c': 'x'}


def test_events_hold_exactly_the_rows(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  with MetricWriter(str(tmp_path)) as w:
    w.write_config({'train': {'rounds': 3}, 'seed': 0})
    for row in ROWS:
      w.write_row(row['round'], row)
  acc = EventAccumulator(str(tmp_path / 'tensorboard'), size_guidance={'scalars': 0, 'tensors': 0})
  acc.Reload()
  expected = _expected()
  assert set(acc.Tags()['scalars']) == set(expected)
  assert {'client/rougeLsum/0', 'client/rougeLsum/1', 'comm/bytes_up', 'flag'} <= set(expected)
  assert 'server/lm' in expected and [s for s, _ in expected['server/lm']] == [3]  # the NaN was dropped
  for tag, points in expected.items():
    got = [(e.step, e.value) for e in acc.Scalars(tag)]
    assert [s for s, _ in got] == [s for s, _ in points], tag
    for (_, g), (_, want) in zip(got, points):
      assert math.isclose(g, want, rel_tol=1e-6), (tag, g, want)
  # Texts: the config and the string metric, at their steps.
  assert set(acc.Tags()['tensors']) == {'config/text_summary', 'samples/server_prediction/text_summary'}
  text = acc.Tensors('samples/server_prediction/text_summary')
  assert [t.step for t in text] == [0]
  assert text[0].tensor_proto.string_val[0].decode() == 'walking slowly'
  config = acc.Tensors('config/text_summary')[0].tensor_proto.string_val[0].decode()
  assert '"rounds": 3' in config


def test_config_from_json_text_and_configdict(tmp_path):
  ml_collections = pytest.importorskip('ml_collections')
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  cfg = ml_collections.ConfigDict({'method': {'name': 'ml_ecs'}})
  with MetricWriter(str(tmp_path / 'a')) as w:
    w.write_config(cfg)
  with MetricWriter(str(tmp_path / 'b')) as w:
    w.write_config(cfg.to_json())
  for d in ('a', 'b'):
    acc = EventAccumulator(str(tmp_path / d / 'tensorboard'), size_guidance={'tensors': 0})
    acc.Reload()
    assert '"name": "ml_ecs"' in acc.Tensors('config/text_summary')[0].tensor_proto.string_val[0].decode()
