"""The comparison benchmark's headroom check (studies/compare/headroom.py), its report rows, the test windows
spread over recordings (data.test_order), and the collaboration benchmark's modality designs."""
import json
import os

import ml_collections
import numpy as np
import pytest

from configs import tiny
from ml_ecs.config.validation import validate
from ml_ecs.data.partition import partition
from studies.compare import grid, headroom
from studies.compare.configs import collaborate


def test_probe_learns_a_separable_task_and_not_noise():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 300)
  x = np.eye(3)[y] * 3 + rng.normal(0, 0.3, (300, 3))
  assert headroom.probe_accuracy(x[:200], y[:200], x[200:], y[200:], 3) == 1.0
  noise = rng.normal(size=(300, 5))
  assert headroom.probe_accuracy(noise[:200], y[:200], noise[200:], y[200:], 3) < 0.5
  assert np.isnan(headroom.probe_accuracy(x[:0], y[:0], x, y, 3))


def test_interleaved_test_order_spreads_the_cap_over_recordings(dataset):
  cfg = tiny.get_config().data
  by_rec = partition(dataset, cfg)
  cfg.test_order = 'interleaved'
  inter = partition(dataset, cfg)
  for a, b in zip(by_rec.clients, inter.clients):
    np.testing.assert_array_equal(a.train_idx, b.train_idx)                 # the same split ...
    np.testing.assert_array_equal(np.sort(a.test_idx), np.sort(b.test_idx))  # ... in another order
    recs = dataset.sequence_ids[b.test_idx]
    n = len(np.unique(recs))
    assert len(np.unique(recs[:n])) == n                      # the first n windows: one per recording
    assert len(np.unique(dataset.sequence_ids[a.test_idx][:n])) < n   # dataset order: whole recordings
  np.testing.assert_array_equal(np.sort(by_rec.public_test_idx), np.sort(inter.public_test_idx))
  pub = dataset.sequence_ids[inter.public_test_idx]
  assert len(np.unique(pub[:len(np.unique(pub))])) == len(np.unique(pub))
  cfg.test_order = 'random'
  with pytest.raises(ValueError, match='data.test_order'):
    partition(dataset, cfg)


def test_collaboration_designs_are_nested_and_shared():
  pairs, singles = collaborate.DESIGNS['pairs'], collaborate.DESIGNS['singles']
  assert len(pairs) == len(singles)
  for design in (pairs, singles):
    for m in collaborate.MODALITIES:
      assert sum(m in s for s in design) >= 2                 # every modality held by several clients
    assert all(len(s) < len(collaborate.MODALITIES) for s in design)   # no client holds all (the server does)
  assert all(set(s) <= set(p) for s, p in zip(singles, pairs))          # nested across the heterogeneity axis
  for variant in collaborate.VARIANTS:
    base = collaborate.get_config(variant)
    cell = (grid.cells(base.grid)[0][0], 0.0, base.data.num_clients, 3, 1)
    validate(grid.cell_config(base, cell))


def test_pairs_design_has_three_device_types(dataset):
  cfg = grid.cell_config(collaborate.get_config('pairs'), ('ml_ecs', 0.0, 12, 0, 0))
  cohorts = partition(dataset, cfg.data).cohorts()
  assert sorted(len(c) for c in cohorts) == [4, 4, 4]


def _small_collaboration() -> ml_collections.ConfigDict:
  base = collaborate.get_config('pairs')
  base.grid.partition_seeds = (0, 1)
  base.grid.lm_check = False
  return base


def test_headroom_is_measured_on_the_federations_labels_and_windows(dataset, tmp_path):
  base = _small_collaboration()
  cfg = grid.cell_config(base, ('ml_ecs', 0.0, 12, 0, 0))
  out = headroom.partition_headroom(dataset, cfg)
  part = partition(dataset, cfg.data)
  assert len(out['clients']) == 12
  for spec in part.clients:
    c = out['clients'][str(spec.client_id)]
    assert c['modalities'] == list(spec.modalities)
    assert c['labelled'] == int(np.ceil(0.15 * len(spec.train_idx)))   # the federation's label fraction
    assert 0.0 <= c['own'] <= 1.0 and 0.0 <= c['pooled'] <= 1.0
  assert out['server_labelled'] == int(np.ceil(0.15 * len(part.public_train_idx)))
  assert out['client_gap'] == pytest.approx(out['client_pooled'] - out['client_own'])
  # with every label everywhere, another node's labels add little: the gap closes
  cfg.data.label_fraction = cfg.data.server_label_fraction = 1.0
  full = headroom.partition_headroom(dataset, cfg)
  assert full['client_own'] > out['client_own'] and full['client_gap'] < out['client_gap']


def test_run_checks_writes_resumes_and_stops_a_grid_without_headroom(tmp_path, monkeypatch):
  base = _small_collaboration()
  out = headroom.run_checks(base, str(tmp_path), train_fn=None, log=lambda s: None)
  stored = json.load(open(tmp_path / 'headroom.json'))
  summary = stored['settings']['mr0__c12']['summary']
  assert summary['partitions'] == 2 and out['settings'] == stored['settings']
  assert summary['client_has_headroom'] == (summary['client_gap'] >= 0.1)
  # resumes: a finished check is read back, not measured again
  monkeypatch.setattr(headroom, 'partition_headroom', lambda *a, **k: pytest.fail('measured again'))
  headroom.run_checks(base, str(tmp_path), train_fn=None, log=lambda s: None)
  monkeypatch.undo()
  # a bar no benchmark can reach stops the grid, naming the field
  base.grid.headroom_min = 2.0
  with pytest.raises(headroom.NoHeadroom, match='grid.headroom_min=2.0'):
    headroom.run_checks(base, str(tmp_path), train_fn=None, log=lambda s: None)
  base.grid.headroom_min = 0.0     # report only
  assert headroom.run_checks(base, str(tmp_path), train_fn=None, log=lambda s: None)['settings']


def test_lm_check_runs_a_full_label_local_cell_and_judges_it(tmp_path):
  base = _small_collaboration()
  base.grid.lm_check = True
  runs = []

  def fake_train(cfg, cdir, cache):   # writes what a finished run leaves, with a chosen sentence rate
    runs.append(cfg)
    os.makedirs(cdir)
    rows = [{'round': 5, 'client/sentence_mean': 0.5, 'client/accuracy_mean': 0.4}]
    open(os.path.join(cdir, 'metrics.jsonl'), 'w').write('\n'.join(json.dumps(r) for r in rows) + '\n')
    open(os.path.join(cdir, 'summary.json'), 'w').write('{}')
    return True

  with pytest.raises(headroom.NoHeadroom, match='LM check'):
    headroom.run_checks(base, str(tmp_path), fake_train, log=lambda s: None)
  assert len(runs) == 1 and runs[0].method.name == 'local' and runs[0].data.label_fraction == 1.0
  lm = json.load(open(tmp_path / 'headroom.json'))['lm_check']
  assert lm['client_sentence'] == 0.5 and lm['minimum'] == 0.9


def test_report_prints_ceilings_and_the_headroom_check():
  rows = [{'method': 'local', 'missing_rate': 0.0, 'num_clients': 12, 'partition_seed': p, 'train_seed': 0,
           'client_accuracy': 0.5, 'server_accuracy': 0.6} for p in (0, 1)]
  hr = {'settings': {'mr0__c12': {'summary': {'partitions': 2, 'client_own': 0.41, 'client_pooled': 0.62,
                                              'client_gap': 0.21, 'server_own': 0.55, 'server_pooled': 0.78,
                                              'server_gap': 0.23}}},
        'lm_check': {'run': 'headroom/x', 'round': 50, 'client_sentence': 0.97, 'client_accuracy': 0.7, 'minimum': 0.9}}
  md = grid.markdown_report(rows, headroom=hr, design='pairs')
  assert '## design pairs (explicit modality sets), 12 clients' in md
  assert '| ceiling: linear probe, own labels | | 2 | 0.410 | 0.550 |' in md
  assert "| ceiling: linear probe, every node's labels | | 2 | 0.620 | 0.780 |" in md
  assert '| mr0__c12 | 2 | 0.410 | 0.620 | +0.210 | 0.550 | 0.780 | +0.230 |' in md
  assert '97.0%' in md
