"""The comparison's statistics: intervals clustered on the partition seed, Holm's correction, the
pre-registered contrasts, and common random numbers in tuning."""
import csv
import importlib
import json
import math
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

from studies.compare import grid, stats, tuning
from tests.paths import ROOT


def test_clustered_t_against_a_hand_computation():
  # partition 0: two training seeds (0.1, 0.3) -> 0.2; partition 1: 0.5; partition 2: (0.0, 0.2) -> 0.1
  ci = stats.clustered_t({0: [0.1, 0.3], 1: [0.5], 2: [0.0, 0.2]})
  means = np.array([0.2, 0.5, 0.1])
  se = means.std(ddof=1) / math.sqrt(3)
  t = scipy_stats.t.ppf(0.975, 2)          # 4.303
  assert ci['mean'] == pytest.approx(means.mean())          # each partition counts once, not each run
  assert ci['mean'] != pytest.approx(np.mean([0.1, 0.3, 0.5, 0.0, 0.2]))
  assert (ci['lo'], ci['hi']) == pytest.approx((means.mean() - t * se, means.mean() + t * se))
  assert ci['p'] == pytest.approx(2 * scipy_stats.t.sf(means.mean() / se, 2))
  assert (ci['clusters'], ci['n']) == (3, 5)
  one = stats.clustered_t({7: [0.1, 0.2]})
  assert one['mean'] == pytest.approx(0.15) and math.isnan(one['lo']) and math.isnan(one['p'])
  same = stats.clustered_t({0: [0.5], 1: [0.5]})
  assert (same['lo'], same['hi'], same['p']) == (0.5, 0.5, 0.0)


def test_holm_against_a_hand_computation():
  # sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06, monotone), 0.5 (x1 = 0.5)
  adj = stats.holm({'a': 0.03, 'b': 0.01, 'c': 0.5, 'd': 0.02, 'e': float('nan')})
  assert adj['b'] == pytest.approx(0.04) and adj['d'] == pytest.approx(0.06)
  assert adj['a'] == pytest.approx(0.06) and adj['c'] == pytest.approx(0.5) and math.isnan(adj['e'])
  assert stats.holm({'x': 0.9, 'y': 0.8})['x'] == 1.0    # capped at 1


def _row(method, p, t, client, server):
  return {'method': method, 'missing_rate': 0.5, 'num_clients': 2, 'partition_seed': p, 'train_seed': t,
          'client_rougeLsum_multi': float(np.mean(list(client.values()))), 'server_rougeLsum_multi': server,
          'client_rougeLsum_multi_by_client': json.dumps(client)}


def test_contrasts_are_paired_clustered_and_holm_corrected():
  results = []
  for p in range(4):
    for t in range(2):
      base = {'0': 0.4 + 0.01 * p, '1': 0.5}
      results.append(_row('local', p, t, base, 0.8))
      results.append(_row('fedavg', p, t, {'0': 0.3 + 0.01 * p, '1': 0.5}, 0.8 + 0.01 * t))
      results.append(_row('ml_ecs', p, t, {'0': base['0'] + 0.02 * (p + 1), '1': 0.5 + 0.01 * t}, 0.8 - 0.01 * p))
  rows = grid.contrast_rows(results, grid.CONTRASTS)
  assert [(r['contrast'], r['side']) for r in rows] == [
      ('ml_ecs - local', 'client'), ('ml_ecs - local', 'server'), ('ml_ecs - fedavg', 'client'),
      ('ml_ecs - fedavg', 'server')]
  client = rows[0]
  # per run: mean over the 2 clients of the paired differences; per partition: mean of its 2 runs
  per_partition = [np.mean([(0.02 * (p + 1) + 0.01 * t) / 2 for t in range(2)]) for p in range(4)]
  assert client['clusters'] == 4 and client['mean'] == pytest.approx(np.mean(per_partition))
  ref = stats.clustered_t({p: [v] for p, v in enumerate(per_partition)})
  assert (client['lo'], client['hi']) == pytest.approx((ref['lo'], ref['hi']))
  adj = stats.holm({str(i): r['p'] for i, r in enumerate(rows)})
  assert [r['p_holm'] for r in rows] == pytest.approx([adj[str(i)] for i in range(4)], nan_ok=True)
  md = grid.markdown_report(results)
  assert 'Pre-registered contrasts' in md and '| ml_ecs - local | client |' in md
  assert 'Exploratory' in md and '| local - fedavg |' in md and 'plateau' not in md
  # The reference baseline is the config's, not the best on the test data.
  assert '| fedavg - local |' in grid.markdown_report(results, reference='local')


def test_tuning_draws_common_random_numbers():
  trials = {m: tuning.draw_trials(m, 6, seed=3) for m in ('local', 'fedavg', 'ml_ecs', 'fedprox')}
  lrs = {m: [t['train.learning_rate'] for t in ts] for m, ts in trials.items()}
  assert lrs['local'] == lrs['fedavg'] == lrs['ml_ecs'] == lrs['fedprox']      # trial i: one rate for all
  assert len(set(lrs['local'])) == 6
  assert tuning.draw_trials('ml_ecs', 6, seed=4)[0]['train.learning_rate'] != lrs['ml_ecs'][0]
  own = [t['method.lambda_ccl'] for t in trials['ml_ecs']]
  mu = [t['method.fedprox_mu'] for t in trials['fedprox']]
  assert len(set(own)) == 6 and len(set(mu)) == 6 and set(trials['local'][0]) == {'train.learning_rate'}
  # the method's own knobs do not shift the common stream (adding a knob keeps every method's rates)
  assert [t['train.learning_rate'] for t in tuning.draw_trials('mmfl', 6, seed=3)] == lrs['local']


def test_stratified_draws_put_one_trial_in_each_slice_of_every_range():
  for count in (4, 7):
    trials = tuning.draw_trials('ml_ecs', count, seed=0)
    for field, (kind, *bounds) in tuning.search_space('ml_ecs').items():
      values = [t[field] for t in trials]
      if kind == 'choice':   # each option equally often (up to one)
        counts = [values.count(o) for o in bounds[0]]
        assert max(counts) - min(counts) <= 1, (field, counts)
        continue
      lo, hi = bounds
      at = lambda v: (math.log(v / lo) / math.log(hi / lo)) if kind == 'log' else (v - lo) / (hi - lo)
      assert sorted(int(at(v) * count) for v in values) == list(range(count)), (field, values)
  # 'random' keeps the stream the committed studies drew (trial by trial, field by field)
  rng = np.random.default_rng([0, 0])
  first = math.exp(math.log(3e-4) + rng.random() * math.log(1e-2 / 3e-4))
  assert tuning.draw_trials('local', 4, 0, 'random')[0]['train.learning_rate'] == pytest.approx(first, rel=1e-12)
  assert tuning.draw_trials('local', 4, 0, 'random')[0]['train.learning_rate'] == pytest.approx(0.0027998622810755814)
  with pytest.raises(ValueError, match='tune.draw'):
    tuning.draw_trials('local', 4, 0, 'sobol')


def test_joined_draws_are_each_draw_as_drawn_alone_in_order():
  """'random+stratified' widens a study that ran 'random': its trials keep their numbers, the new ones follow."""
  for method in ('local', 'ml_ecs'):
    both = tuning.draw_trials(method, 4, 0, 'random+stratified')
    assert both == tuning.draw_trials(method, 4, 0, 'random') + tuning.draw_trials(method, 4, 0, 'stratified')
  # common random numbers still: every method's trial i has the same learning rate
  lrs = lambda m: [t['train.learning_rate'] for t in tuning.draw_trials(m, 4, 0, 'random+stratified')]
  assert lrs('local') == lrs('ml_ecs') == lrs('fedavg') and len(set(lrs('local'))) == 8
  for bad in ('random+sobol', 'random+', '+'):
    with pytest.raises(ValueError, match='tune.draw'):
      tuning.draw_kinds(bad)


@pytest.mark.parametrize('config, folder, draw', [
    ('compare:reduced', 'compare_reduced_fixed', None),
    ('collaborate:pairs_reduced', 'collab_pairs_reduced', None),
    ('collaborate:pairs_reduced', 'collab_pairs_tuning_stratified', 'stratified'),     # their commands'
    ('collaborate:pairs_reduced', 'collab_pairs_retuned', 'random+stratified')])      # --config.tune.draw
def test_committed_studies_draw_the_trials_they_ran(config, folder, draw):
  """A committed study's command resumes from its files only if its config still draws the same trials."""
  module, variant = config.split(':')
  cfg = importlib.import_module(f'studies.compare.configs.{module}').get_config(variant)
  if draw:
    cfg.tune.draw = draw
  root = os.path.join(ROOT, 'studies', 'compare', 'results', folder)
  with open(os.path.join(root, 'tuning.csv')) as f:
    rows = list(csv.DictReader(f))
  assert {r['method'] for r in rows} == set(cfg.tune.methods)
  for r in rows:
    point = tuning.draw_trials(r['method'], cfg.tune.trials, cfg.tune.seed, cfg.tune.draw)[int(r['trial'])]
    for field, value in point.items():
      assert (value == r[field]) if isinstance(value, str) else value == pytest.approx(float(r[field]), rel=1e-12)
