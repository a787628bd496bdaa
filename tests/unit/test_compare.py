"""The comparison protocol: grid resume, last-k scores, the report's contrasts, tuning, reproduction check
(the statistics themselves: tests/unit/test_compare_stats.py)."""
import copy
import csv
import json
import math
import os
import shutil

import pytest

from studies.compare import grid as compare, keep, stats, tuning
from ml_ecs.run import metrics_io


def _base(tiny_config, **grid):
  base = copy.deepcopy(tiny_config)
  base.grid = dict(methods=('fedavg', 'ml_ecs'), missing_rates=(0.3, 0.7), num_clients=(3,), partition_seeds=(0, 1),
                   train_seeds=(0,), modality_seed=0, last_k=3, tuned='', reproduce=0)
  base.grid.update(grid)
  return base


def _fake_train(calls, stop_at=None, gain=0.1):
  """A stand-in for ml_ecs.run.trainer.train: deterministic rows; ml_ecs beats fedavg by `gain` on every client."""
  def train(cfg, cdir, cache):
    calls.append(os.path.basename(cdir))
    base = 0.4 + 0.01 * cfg.data.seed + 0.001 * cfg.seed
    score = base + (gain if cfg.method.name == 'ml_ecs' else 0.0)
    rows = []
    for r in range(5):
      level = score - 0.05 * (4 - r)      # still rising: the last 3 evaluations average below the final one
      rows.append({'round': r, 'client/rougeLsum_mean': level, 'server/rougeLsum': level / 2,
                   'client/accuracy_mean': 0.5, 'server/accuracy': 0.6, 'comm/ratio': 0.01,
                   'client/rougeLsum': {'0': level, '1': level + 0.02, '2': level - 0.02},
                   'client/accuracy': {'0': 0.5, '1': 0.5, '2': 0.5}})
    os.makedirs(cdir, exist_ok=True)
    metrics_io.write_json(os.path.join(cdir, 'config.json'), json.loads(cfg.to_json_best_effort()))
    metrics_io.write_jsonl(os.path.join(cdir, 'metrics.jsonl'), rows)
    metrics_io.write_json(os.path.join(cdir, 'clients.json'), [
        {'client_id': c, 'modalities': mods} for c, mods in enumerate((['a', 'b'], ['a', 'b'], ['c']))])
    if stop_at is not None and len(calls) == stop_at:
      return False                  # interrupted (e.g. SIGTERM) before this cell's summary is written
    metrics_io.write_json(os.path.join(cdir, 'summary.json'), {})
    metrics_io.write_jsonl(os.path.join(cdir, 'timing.jsonl'), [{'round': 4, 'time/elapsed_s': 1.0}])
    return True
  return train


def test_grid_resumes_scores_last_k_and_pairs_differences(tmp_path, tiny_config):
  base = _base(tiny_config)
  calls = []
  assert len(compare.run_grid(base, str(tmp_path), _fake_train(calls, stop_at=3), log=lambda s: None)) == 2
  assert len(calls) == 3
  results = compare.run_grid(base, str(tmp_path), _fake_train(calls), log=lambda s: None)
  assert len(calls) == 3 + 6 and len(results) == 8      # two finished cells were not redone
  r = next(x for x in results if x['method'] == 'fedavg' and x['partition_seed'] == 1)
  assert r['client_rougeLsum'] == pytest.approx(0.41 - 0.05)     # mean of rounds 2..4: 0.31, 0.36, 0.41
  assert r['final_client_rougeLsum'] == pytest.approx(0.41)
  assert 'plateau_client' not in r                                # no plateau under a decaying schedule
  assert json.loads(r['client_rougeLsum_by_client'])['1'] == pytest.approx(0.36 + 0.02)
  md = (tmp_path / 'results.md').read_text()
  assert 'Pre-registered contrasts' in md and 'best baseline' not in md
  assert '| ml_ecs - fedavg | client | **+0.100 [+0.100, +0.100]** | 2 |' in md   # 2 partition seeds
  assert '| ml_ecs - fedavg | server | **+0.050 [+0.050, +0.050]** | 2 |' in md
  assert (tmp_path / 'rouge_vs_round.png').stat().st_size > 1000
  assert (tmp_path / 'rouge_vs_missing_rate.png').stat().st_size > 1000
  header = (tmp_path / 'results.csv').read_text().splitlines()[0]
  assert 'partition_seed' in header and 'train_seed' in header
  env = metrics_io.read_jsonl(str(tmp_path / 'environment.jsonl'))
  assert len(env) == 2 and env[0]['cpu'] and env[0]['packages']['jax'] and 'xla_flags' in env[0]


def test_a_new_workdir_goes_on_from_the_keep_directory(tmp_path, tiny_config):
  base, first, second, kept = _base(tiny_config), tmp_path / 'a', tmp_path / 'b', tmp_path / 'keep'
  calls = []
  compare.run_grid(base, str(first), _fake_train(calls, stop_at=4), log=lambda s: None)   # 3 finished, 1 not
  for run in keep.finished_runs(str(first)):                     # what a keep must leave behind
    os.makedirs(first / run / 'checkpoints' / '5')
    (first / run / 'checkpoints' / '5' / 'state').write_text('big')
  os.makedirs(first / 'cache' / 'jax')
  (first / 'cache' / 'jax' / 'entry').write_text('compiled')
  (first / 'README.md').write_text('old notes')                 # not a file of the protocol: stays out
  os.makedirs(kept)
  (kept / 'README.md').write_text('what this folder is')
  assert keep.save(str(first), str(kept)) > 0 and keep.save(str(first), str(kept)) == 0   # nothing changed twice
  assert (kept / 'README.md').read_text() == 'what this folder is'
  finished = keep.finished_runs(str(first))
  assert len(finished) == 3 and keep.finished_runs(str(kept)) == finished
  files = {os.path.relpath(os.path.join(d, f), kept) for d, _, fs in os.walk(kept) for f in fs}
  assert not any('checkpoints' in f or f.startswith('cache') for f in files)
  assert {'results.md', 'results.csv', 'environment.jsonl'} <= files
  unfinished = [d for d in os.listdir(first / 'cells') if f'cells/{d}' not in finished]
  assert len(unfinished) == 1 and not (kept / 'cells' / unfinished[0]).exists()
  # A new machine: restore, then the same grid runs only the 5 cells that had not finished.
  os.makedirs(second)
  (second / 'results.md').write_text('newer')                    # a workdir's own file is not overwritten
  assert keep.restore(str(kept), str(second)) == len(files) - 2   # not results.md, not the README
  assert (second / 'results.md').read_text() == 'newer' and not (second / 'README.md').exists()
  calls2 = []
  results = compare.run_grid(base, str(second), _fake_train(calls2), log=lambda s: None)
  assert len(calls2) == 5 and len(results) == 8 and unfinished[0] in calls2
  assert set(calls2).isdisjoint(os.path.basename(f) for f in finished)
  # A run the workdir holds unfinished but the keep holds finished is restored finished.
  partial = first / 'cells' / unfinished[0]
  assert not (partial / 'summary.json').exists()
  keep.save(str(second), str(kept))
  assert keep.restore(str(kept), str(first)) > 0 and (partial / 'summary.json').exists()
  assert metrics_io.read_jsonl(str(partial / 'metrics.jsonl')) == metrics_io.read_jsonl(
      str(second / 'cells' / unfinished[0] / 'metrics.jsonl'))


def test_deadline_stops_before_a_new_cell(tmp_path, tiny_config):
  calls = []
  out = compare.run_grid(_base(tiny_config), str(tmp_path), _fake_train(calls), log=lambda s: None, deadline=0.0)
  assert out == [] and calls == []


def test_unknown_method_refused_before_any_cell(tmp_path, tiny_config):
  with pytest.raises(ValueError, match=r"grid.methods has unknown methods \['nope'\]"):
    compare.run_grid(_base(tiny_config, methods=('fedavg', 'nope')), str(tmp_path), _fake_train([]), log=print)
  assert not (tmp_path / 'cells').exists()


def test_cell_directory_changes_with_any_setting(tiny_config):
  base = _base(tiny_config)
  cell = ('fedavg', 0.3, 3, 0, 1)
  cfg = compare.cell_config(base, cell)
  assert (cfg.data.seed, cfg.seed, cfg.data.modality_seed) == (0, 1, 0)    # partition and training seeds apart
  first = compare.cell_dir('/w', cell, cfg)
  cfg.train.rounds += 1
  assert compare.cell_dir('/w', cell, cfg) != first
  assert os.path.basename(first).startswith('fedavg__mr0.3__c3__p0__t1__')


def test_tuned_values_per_method_and_ablations_use_ml_ecs(tmp_path, tiny_config):
  path = tmp_path / 'tuned.json'
  path.write_text(json.dumps({'fedavg': {'overrides': {'train.learning_rate': 1e-3}},
                              'ml_ecs': {'overrides': {'train.learning_rate': 5e-3, 'method.lambda_ccl': 0.3}}}))
  base = _base(tiny_config, tuned=str(path))
  tuned = compare.tuned_values(base.grid)
  assert compare.cell_config(base, ('fedavg', 0.3, 3, 0, 0), tuned).train.learning_rate == 1e-3
  ablation = compare.cell_config(base, ('ml_ecs_no_se_ccl', 0.3, 3, 0, 0), tuned)
  assert ablation.train.learning_rate == 5e-3 and ablation.method.lambda_ccl == 0.3 and not ablation.method.se_ccl
  with pytest.raises(FileNotFoundError, match='grid.tuned'):
    compare.tuned_values(_base(tiny_config, tuned=str(tmp_path / 'missing.json')).grid)


def test_tuning_gives_every_method_the_same_budget_on_validation_data(tmp_path, tiny_config):
  base = _base(tiny_config)
  base.data.client_val_fraction = 0.2
  base.tune = dict(methods=('fedavg', 'fedprox', 'ml_ecs'), trials=3, seed=0, seeds=(100, 101),
                   missing_rate=0.5, rounds=4)
  base.train.rounds, base.grid.num_clients = 9, (4,)
  seen = []

  def fake(cfg, tdir, cache):
    seen.append((cfg.method.name, cfg.eval.split, cfg.data.seed, cfg.seed, cfg.train.learning_rate))
    assert (cfg.train.rounds, cfg.data.num_clients) == (4, 4)   # tune.rounds; the grid's federation size
    lr = cfg.train.learning_rate
    rows = [{'round': r, 'client/rougeLsum_mean': -abs(math.log(lr / 2e-3)) + 0.01 * cfg.seed,
             'server/rougeLsum': 0.0} for r in range(4)]
    os.makedirs(tdir, exist_ok=True)
    metrics_io.write_jsonl(os.path.join(tdir, 'metrics.jsonl'), rows)
    metrics_io.write_json(os.path.join(tdir, 'summary.json'), {})
    return True

  best = tuning.run_tuning(base, str(tmp_path), fake, log=lambda s: None)
  counts = {m: sum(1 for s in seen if s[0] == m) for m in ('fedavg', 'fedprox', 'ml_ecs')}
  assert counts == {'fedavg': 6, 'fedprox': 6, 'ml_ecs': 6}        # 3 trials x 2 tuning seeds each
  assert {s[1] for s in seen} == {'val'} and {(s[2], s[3]) for s in seen} == {(100, 100), (101, 101)}
  assert len({s[4] for s in seen}) == 3                              # common random numbers: 3 rates for all
  rows = list(csv.DictReader(open(tmp_path / 'tuning.csv')))
  r0 = next(r for r in rows if r['method'] == 'fedavg' and r['trial'] == '0')
  assert float(r0['objective']) == pytest.approx((float(r0['objective_s100']) + float(r0['objective_s101'])) / 2)
  for m in counts:                                     # the trial whose lr is closest to 2e-3 wins
    lrs = [s[4] for s in seen if s[0] == m]
    assert best[m]['overrides']['train.learning_rate'] == min(lrs, key=lambda x: abs(math.log(x / 2e-3)))
  assert set(best['fedprox']['overrides']) == {'train.learning_rate', 'method.fedprox_mu'}
  assert json.loads((tmp_path / 'tuned.json').read_text()).keys() == best.keys()
  seen.clear()
  tuning.run_tuning(base, str(tmp_path), fake, log=lambda s: None)
  assert not seen                                      # finished trials are not redone
  base.data.client_val_fraction = 0.0
  with pytest.raises(ValueError, match='client_val_fraction'):
    tuning.run_tuning(base, str(tmp_path / 'b'), fake, log=lambda s: None)


def test_trials_are_deterministic_and_inside_the_space():
  a, b = tuning.draw_trials('ml_ecs', 8, 0), tuning.draw_trials('ml_ecs', 8, 0)
  assert a == b and len(a) == 8 and tuning.draw_trials('ml_ecs', 8, 1) != a
  for point in a:
    for field, (kind, *bounds) in tuning.search_space('ml_ecs').items():
      assert point[field] in bounds[0] if kind == 'choice' else bounds[0] <= point[field] <= bounds[1]
  # the categorical MMA weighting is drawn too, and over 8 trials takes more than one value
  assert len({p['method.mma_backbone'] for p in a}) > 1


def _fake_program(calls, programs):
  """A stand-in for ml_ecs.run.runs_trainer.train_runs: each run's rows as `_fake_train` writes them, moved
  by a float-sized amount that depends on the program's size, the run's place in it and the runs computed at once
  (as the program's rounding does), and program.json."""
  def train_many(cfgs, cdirs, program_dir, cache, run_batch=None):
    programs.append([os.path.basename(d) for d in cdirs])
    batch = run_batch or 1   # the grid's setting on a CPU
    for r, (cfg, cdir) in enumerate(zip(cfgs, cdirs)):
      _fake_train(calls)(cfg, cdir, cache)
      path = os.path.join(cdir, 'metrics.jsonl')
      rows = metrics_io.read_jsonl(path)
      for row in rows:
        row['client/rougeLsum_mean'] += 1e-9 * (10 * len(cdirs) + r) + 1e-10 * batch
      metrics_io.write_jsonl(path, rows)
      metrics_io.write_json(os.path.join(cdir, 'program.json'), {
          'runs': len(cdirs), 'position': r, 'members': [os.path.basename(d) for d in cdirs], 'run_batch': batch})
    return True
  return train_many


def test_reproduction_check(tmp_path, tiny_config):
  base = _base(tiny_config)
  calls = []
  results = compare.run_grid(base, str(tmp_path), _fake_train(calls), log=lambda s: None)
  records = compare.reproduce(base, str(tmp_path), _fake_train(calls), count=3, log=lambda s: None)
  assert len(records) == 3 and all(r['identical'] and r['same_rows'] and r['worst_abs_diff'] == 0 for r in records)
  assert all(r['client_original'] == r['client_rerun'] and r['server_metric'] for r in records)
  assert all(r['rerun'] == 'single run' and r['drift_from_round'] is None for r in records)
  compare.write_reports(results, str(tmp_path))
  text = (tmp_path / 'results.md').read_text()
  assert '## Reproduction check' in text and 'plateau' not in text


def test_a_cell_from_a_program_is_reproduced_by_rerunning_its_program(tmp_path, tiny_config):
  base = _base(tiny_config, runs_per_program=2, partition_seeds=(0, 1, 2), missing_rates=(0.3,))
  calls, programs = [], []
  compare.run_grid(base, str(tmp_path), _fake_train(calls), log=lambda s: None,
                   train_many=_fake_program(calls, programs))
  grid_programs = list(programs)
  assert [len(p) for p in grid_programs] == [2, 2]      # per method: partitions 0+1; partition 2 runs alone
  records = compare.reproduce(base, str(tmp_path), _fake_train(calls), count=2, log=lambda s: None,
                              train_many=_fake_program(calls, programs))
  # the first cell is rerun in its program: the same runs in the same places, so every number agrees
  assert programs[len(grid_programs)] == grid_programs[0]
  prog = [r for r in records if r['rerun'] == 'program of 2']
  assert len(prog) == 1 and prog[0]['cell'] == grid_programs[0][0]
  assert prog[0]['identical'] and prog[0]['program_identical'] == 2 and prog[0]['program_known_by'] == 'program.json'
  # alone, it differs by the program's rounding only: no value moves by 0.1%
  single = {r['cell']: r for r in records if r['rerun'] == 'single run'}
  first = single[grid_programs[0][0]]
  assert not first['identical'] and 0 < first['worst_abs_diff'] < 1e-7 and first['drift_from_round'] is None
  # the last cell ran alone in the grid: its single rerun is its reproduction, and exact
  last = single[next(c for c in single if c.startswith('ml_ecs__mr0.3__c3__p2'))]
  assert last['identical'] and len(records) == 3
  # a program.json from before run_batch: its program computed all its runs at once, and is rerun so
  for c in grid_programs[0]:
    path = os.path.join(tmp_path, 'cells', c, 'program.json')
    with open(path) as f:
      found = json.load(f)
    assert found['run_batch'] == 1
    metrics_io.write_json(path, {k: v for k, v in found.items() if k != 'run_batch'})
  os.remove(tmp_path / 'repro.json')
  shutil.rmtree(tmp_path / 'repro_program')
  batches = []
  compare.reproduce(base, str(tmp_path), _fake_train(calls), count=2, log=lambda s: None,
                    train_many=lambda *a, run_batch=None: batches.append(run_batch) or False)   # False: stopped
  assert batches == [2]
  # without program.json the program is the grid's grouping of its cells
  os.remove(os.path.join(tmp_path, 'cells', grid_programs[0][0], 'program.json'))
  (tmp_path / 'repro.json').unlink(missing_ok=True)
  records = compare.reproduce(base, str(tmp_path), _fake_train(calls), count=2, log=lambda s: None,
                              train_many=_fake_program(calls, programs))
  assert [r['program_known_by'] for r in records if 'program_known_by' in r] == ['grid order']
  results = compare.run_grid(base, str(tmp_path), _fake_train(calls), log=lambda s: None)
  text = '\n'.join(compare.repro_section(records, results))
  assert '| program of 2 | True (2 of 2 runs of the program) |' in text
  assert text.count('| never |') == 3


def test_seed_spread_is_the_mean_range_over_training_seeds():
  rows = [{'method': 'm', 'partition_seed': p, 'train_seed': t, 'x': v}
          for p, t, v in ((0, 0, 0.5), (0, 1, 0.7), (1, 0, 0.4), (1, 1, 0.3), (2, 0, 0.9))]
  assert compare.seed_spread(rows, 'm', 'x') == pytest.approx((0.2 + 0.1) / 2)
  assert compare.seed_spread(rows[-1:], 'm', 'x') is None


def test_metric_differences_find_the_largest_gap_anywhere_in_the_rows():
  a = [{'round': 5, 'x': 1.0, 'per': {'0': 0.5, '1': 0.25}, 'ids': [1, 2], 'ok': True},
       {'round': 10, 'x': 2.0, 'per': {'0': 0.5, '1': 0.25}}]
  b = [{'round': 5, 'x': 1.0 + 1e-7, 'per': {'0': 0.5, '1': 0.25}, 'ids': [1, 2], 'ok': True},
       {'round': 10, 'x': 2.0, 'per': {'0': 0.5, '1': 0.375}}]
  d = compare.metric_differences(a, b)
  assert d == {'same_rows': True, 'worst_abs_diff': 0.125, 'worst_at': 'round 10: per/1', 'drift_from_round': 10}
  assert compare.metric_differences(a, a)['worst_abs_diff'] == 0.0
  assert not compare.metric_differences(a, b[:1])['same_rows']
  nan = [dict(a[0], x=float('nan'))]
  assert math.isnan(compare.metric_differences(a[:1], nan)['worst_abs_diff'])


def test_differences_by_client_modality_set_against_a_hand_computation():
  rows = []
  for p in range(3):
    for method, gain in (('local', (0.0, 0.0, 0.0)), ('ml_ecs', (0.1 + 0.01 * p, 0.1 + 0.01 * p, -0.05))):
      rows.append({'method': method, 'missing_rate': 0.0, 'num_clients': 3, 'partition_seed': p, 'train_seed': 0,
                   'client_accuracy': 0.5, 'server_accuracy': 0.5,
                   'client_accuracy_by_client': json.dumps({str(c): 0.4 + g for c, g in enumerate(gain)}),
                   'client_modalities': json.dumps({'0': 'a+b', '1': 'a+b', '2': 'c'})})
  ab = compare.paired_difference(rows, 'ml_ecs', 'local', 'client_accuracy', 'client_accuracy_by_client',
                                 modalities='a+b')
  c = compare.paired_difference(rows, 'ml_ecs', 'local', 'client_accuracy', 'client_accuracy_by_client',
                                modalities='c')
  both = compare.paired_difference(rows, 'ml_ecs', 'local', 'client_accuracy', 'client_accuracy_by_client')
  assert ab['mean'] == pytest.approx(0.11) and ab['clusters'] == 3 and ab['lo'] < 0.11 < ab['hi']
  assert c['mean'] == pytest.approx(-0.05)
  assert both['mean'] == pytest.approx((2 * 0.11 - 0.05) / 3)
  text = compare.markdown_report(rows, contrasts=(('ml_ecs', 'local'),), headline='accuracy')
  assert 'By client modality set' in text
  line = next(l for l in text.splitlines() if l.startswith('| ml_ecs - local | +0.110'))
  assert line.split(' | ')[2].startswith('-0.050')
  one_set = [dict(r, client_modalities=json.dumps({'0': 'a', '1': 'a', '2': 'a'})) for r in rows]
  assert 'By client modality set' not in compare.markdown_report(one_set, contrasts=(('ml_ecs', 'local'),))


def test_last_k():
  rows = [{'round': 0, 'm': 0.0}, {'round': 1}, {'round': 2, 'm': 1.0}, {'round': 3, 'm': 2.0}, {'round': 4, 'm': 4.0}]
  assert stats.last_k_mean(rows, 'm', 2) == 3.0 and stats.last_k_mean(rows, 'm', 3) == pytest.approx(7 / 3)


def test_headline_keys_and_tuning_objective():
  single = [{'round': 1, 'client/rougeLsum_mean': 0.2, 'server/rougeLsum': 0.4}]
  multi = [{'round': 1, 'client/rougeLsum_mean': 0.2, 'server/rougeLsum': 0.4,
            'client/rougeLsum_multi_mean': 0.5, 'server/rougeLsum_multi': 0.9}]
  assert stats.headline_keys(single) == ('client/rougeLsum_mean', 'server/rougeLsum')
  assert stats.headline_keys(multi) == ('client/rougeLsum_multi_mean', 'server/rougeLsum_multi')
  assert tuning.objective(single, 3) == pytest.approx(0.3) and tuning.objective(multi, 3) == pytest.approx(0.7)
  multi[0].update({'client/accuracy_mean': 0.2, 'server/accuracy': 0.6})
  assert stats.headline_keys(multi, 'accuracy') == ('client/accuracy_mean', 'server/accuracy')
  assert tuning.objective(multi, 3, 'accuracy') == pytest.approx(0.4)
  with pytest.raises(ValueError, match='grid.headline'):
    stats.headline_keys(multi, 'bleu')


def test_contrasts_follow_the_preregistered_headline():
  rows = [{'method': m, 'missing_rate': 0.0, 'num_clients': 2, 'partition_seed': p, 'train_seed': 0,
           'client_rougeLsum_multi': 0.5, 'server_rougeLsum_multi': 0.5, 'client_accuracy': acc + 0.01 * p,
           'server_accuracy': acc, 'client_rougeLsum_multi_by_client': json.dumps({'0': 0.5, '1': 0.5}),
           'client_accuracy_by_client': json.dumps({'0': acc, '1': acc + 0.02 * p})}
          for m, acc in (('ml_ecs', 0.6), ('local', 0.5)) for p in range(3)]
  by_rouge = compare.contrast_rows(rows, [('ml_ecs', 'local')])
  by_acc = compare.contrast_rows(rows, [('ml_ecs', 'local')], headline='accuracy')
  assert [r['mean'] for r in by_rouge] == [0.0, 0.0]
  assert [round(r['mean'], 6) for r in by_acc] == [0.1, 0.1]
  md = compare.markdown_report(rows, contrasts=[('ml_ecs', 'local')], headline='accuracy')
  assert 'headline accuracy' in md


@pytest.mark.parametrize('name', ['compare', 'compare:reduced', 'compare_secondary:discriminating', 'compare_secondary:embedded'])
def test_grid_configs_validate_every_cell(name):
  import importlib
  module, _, variant = name.partition(':')
  cfg = importlib.import_module(f'studies.compare.configs.{module}').get_config(*([variant] if variant else []))
  todo, configs = compare.check_grid(cfg)
  assert len(todo) == len(configs) and len({(c.data.seed, c.seed) for c in configs}) == \
      len(set(cfg.grid.partition_seeds)) * len(set(cfg.grid.train_seeds))
  assert {c.data.modality_seed for c in configs} == {cfg.grid.modality_seed}


def test_ablations_reuse_ml_ecs_tuning_but_not_the_component_they_remove(tiny_config):
  tuned = {'ml_ecs': {'train.learning_rate': 1e-3, 'method.mma_backbone': 'modality', 'method.lambda_ccl': 0.3}}
  assert compare.tuned_for('ml_ecs', tuned) == tuned['ml_ecs']
  assert compare.tuned_for('ml_ecs_no_mma', tuned) == {'train.learning_rate': 1e-3, 'method.lambda_ccl': 0.3}
  assert compare.tuned_for('ml_ecs_no_ccl', tuned) == tuned['ml_ecs']   # lambda_ccl is unused without CCL
  base = _base(tiny_config)
  cfg = compare.cell_config(base, ('ml_ecs_no_mma', 0.3, 3, 0, 0), tuned)
  assert cfg.method.mma_backbone == 'samples' and cfg.train.learning_rate == 1e-3
  assert compare.cell_config(base, ('ml_ecs', 0.3, 3, 0, 0), tuned).method.mma_backbone == 'modality'


def test_mechanism_telemetry_is_summarised_and_a_silent_mechanism_is_flagged():
  rows = [{'round': 0, 'server/se_ccl_clients': 9}]   # round 0 is the evaluation before training
  rows += [{'round': r, 'server/se_ccl_clients': s, 'client/gate_shared': 0.8, 'mma/accel_clients': 0,
            'mma/accel_weight': 0.0, 'mma/excluded': 0, 'client/private_lm': 1.0}
           for r, s in ((1, 0), (2, 4), (3, 2), (4, 0))]
  t = compare.telemetry(rows)
  assert t['server/se_ccl_clients'] == {'mean': 1.5, 'fired': 0.5}
  assert t['client/gate_shared'] == {'mean': 0.8, 'fired': 1.0}
  assert 'client/private_lm' not in t and 'mma/excluded' not in t and t['mma/accel_clients']['fired'] == 0.0
  results = [{'method': 'ml_ecs', 'telemetry': json.dumps(t)}, {'method': 'local', 'telemetry': '{}'}]
  md = '\n'.join(compare.telemetry_section(results))
  assert '| ml_ecs | server/se_ccl_clients | 1.500 | 50% |' in md
  assert '| ml_ecs | mma/accel_clients | 0.000 | 0% **never fired** |' in md
  assert 'mma/accel_weight | 0.000 | 0% |' in md     # the weight repeats the clients' flag: not flagged twice


def test_train_seeds_for_runs_some_methods_on_fewer_training_seeds(tiny_config):
  base = _base(tiny_config, methods=('ml_ecs', 'ml_ecs_no_ccl'), missing_rates=(0.3,), train_seeds=(0, 1))
  base.grid.train_seeds_for = {'ml_ecs_no_ccl': (0,)}
  todo = compare.cells(base.grid)
  assert [c for c in todo if c[0] == 'ml_ecs_no_ccl'] == [('ml_ecs_no_ccl', 0.3, 3, p, 0) for p in (0, 1)]
  assert len([c for c in todo if c[0] == 'ml_ecs']) == 4
  base.grid.train_seeds_for = {'fedavg': (0,)}
  with pytest.raises(ValueError, match='train_seeds_for names methods'):
    compare.cells(base.grid)


def _fake_many(calls, train):
  """A stand-in for ml_ecs.run.runs_trainer.train_runs: each run as `train` writes it; records the groups."""
  def many(cfgs, cdirs, program_dir, cache):
    calls.append([os.path.basename(d) for d in cdirs])
    return all(train(c, d, cache) for c, d in zip(cfgs, cdirs))
  return many


def test_program_groups_join_runs_that_differ_in_seeds_only(tiny_config):
  cfgs = []
  for method, seed, lr in [('a', 0, 1e-3), ('a', 1, 2e-3), ('b', 0, 1e-3), ('a', 2, 1e-3), ('a', 3, 1e-3)]:
    c = copy.deepcopy(tiny_config)
    c.method.mma_modality = 'observations' if method == 'a' else 'client'   # a field a program may not vary
    c.method.lambda_ccl = 0.1 * (seed + 1)                                 # one it may
    c.seed, c.data.seed, c.train.learning_rate = seed, seed + 10, lr
    cfgs.append(c)
  assert compare.program_groups(cfgs, 3) == [[0, 1, 3], [2], [4]]
  from ml_ecs.core import runs as runs_lib
  for group in compare.program_groups(cfgs, 3):   # every group is one the program accepts
    runs_lib.check_configs([cfgs[i] for i in group])
  assert compare.program_groups(cfgs, 1) == [[0], [1], [2], [3], [4]]


def test_grid_runs_cells_of_one_structure_as_programs(tmp_path, tiny_config):
  base = _base(tiny_config, runs_per_program=4)
  calls, groups = [], []
  train = _fake_train(calls)
  results = compare.run_grid(base, str(tmp_path), train, log=lambda s: None, train_many=_fake_many(groups, train))
  assert len(results) == 8
  # methods and missing rates are structure; the 2 partition seeds of each (method, rate) share a program
  assert [len(g) for g in groups] == [2, 2, 2, 2] and len(calls) == 8
  assert all(len({name.split('__p')[0] for name in g}) == 1 for g in groups)
  # rows in grid order, whatever order the programs ran in
  assert [r['cell'].rsplit('__', 1)[0] for r in results] == [compare.cell_name(*c) for c in compare.cells(base.grid)]
  # resumed: nothing runs again
  again = compare.run_grid(base, str(tmp_path), train, log=lambda s: None, train_many=_fake_many(groups, train))
  assert len(groups) == 4 and [r['cell'] for r in again] == [r['cell'] for r in results]


def test_tuning_runs_trials_that_differ_in_learning_rate_as_programs(tmp_path, tiny_config):
  base = _base(tiny_config, runs_per_program=8)
  base.data.client_val_fraction = 0.2
  base.tune = dict(methods=('fedavg',), trials=3, rounds=0, seed=0, seeds=(100, 101), missing_rate=0.5)
  calls, groups = [], []
  train = _fake_train(calls)
  best = tuning.run_tuning(base, str(tmp_path), train, log=lambda s: None, train_many=_fake_many(groups, train))
  assert [len(g) for g in groups] == [6] and len(calls) == 6   # 3 trials x 2 seeds: one program
  assert best['fedavg']['trial'] in (0, 1, 2)


def test_a_group_of_other_structure_runs_cell_by_cell(tmp_path, tiny_config):
  from ml_ecs.core.runs import DifferentStructure
  base = _base(tiny_config, runs_per_program=4)
  calls = []

  def many(cfgs, cdirs, program_dir, cache):
    raise DifferentStructure('run 1 has cohorts ...')

  logs = []
  results = compare.run_grid(base, str(tmp_path), _fake_train(calls), log=logs.append, train_many=many)
  assert len(results) == 8 and len(calls) == 8
  assert any('running them one by one' in line for line in logs)


def test_stop_after_ends_the_protocol_after_a_stage_and_a_rerun_goes_on(tmp_path, tiny_config, monkeypatch, capsys):
  import studies.compare.run as protocol
  from studies.compare import headroom
  monkeypatch.setattr(headroom, 'run_checks', lambda *a, **k: {'settings': {}})
  base = _base(tiny_config)
  base.data.client_val_fraction = 0.2
  base.tune = dict(methods=('fedavg', 'ml_ecs'), trials=2, rounds=0, seed=0, seeds=(100,), missing_rate=0.5,
                   draw='stratified')
  calls = []
  stages = lambda cfg, stop_after: protocol._stages(cfg, str(tmp_path), _fake_train(calls), None, None, [], lambda: 0,
                                                   lambda s: None, lambda: None, stop_after)
  assert stages(copy.deepcopy(base), 'tuning') == 0
  assert (tmp_path / 'tuned.json').exists() and not (tmp_path / 'cells').exists() and len(calls) == 4
  assert '--stop_after=tuning' in capsys.readouterr().out
  assert stages(copy.deepcopy(base), 'reproduce') == 0     # the same command without it: the grid, no retuning
  assert len(calls) == 4 + 8 and all('__mr' in c for c in calls[4:]) and (tmp_path / 'results.csv').exists()
