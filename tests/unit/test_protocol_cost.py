"""benchmarks/protocol_cost.py: the protocol's jobs as the comparison groups them, and the cost model."""
import json
import statistics
import sys

import pytest

from benchmarks import protocol_cost as pc
from ml_ecs.config.cli import load_config

ROUNDS = 6


def fixed(r):
  return 100.0 + 3.0 * r


def later(r):
  return 0.7 * r


def ev(r):
  return 0.5 * r


def piece(r, slow=None):
  """A measured program of r runs whose parts are linear in r; `slow`: one later round that took this long."""
  steady = [later(r)] * (ROUNDS - 1)
  if slow is not None:
    steady[1] = slow
  return {'wall_s': fixed(r) + sum(steady) + ev(r), 'steady_round_s': steady, 'last_eval_s': ev(r)}


def report(sizes=(1, 4, 10)):
  sep = piece(1)
  sep['per_run_s'] = [90.0, 30.0, 50.0]
  return {'rounds': ROUNDS, 'config': 'studies/compare/configs/collaborate.py:pairs_reduced', 'method': 'ml_ecs',
          'programs': {str(r): piece(r) for r in sizes}, 'separate': sep}


def test_evaluations_count_round_zero_every_k_and_the_last():
  assert pc.evaluations(50, 5) == 11
  assert pc.evaluations(6, 6) == 2
  assert pc.evaluations(7, 5) == 3


def test_program_cost_interpolates_and_extrapolates_the_measured_parts():
  m = pc.CostModel(report())
  for r in (4, 7, 20):   # measured, between two sizes, beyond the largest
    assert m.program(r, 50, 11) == pytest.approx(fixed(r) + 49 * later(r) + 10 * ev(r))
  assert m.program(4, ROUNDS, 2) == pytest.approx(report()['programs']['4']['wall_s'])   # the measurement itself
  assert m.extrapolated(20) and not m.extrapolated(7)


def test_one_measured_size_scales_rounds_and_evaluations_with_the_runs():
  m = pc.CostModel(report(sizes=(10,)))
  assert m.program(20, 50, 11) == pytest.approx(fixed(10) + 49 * later(20) + 10 * ev(20))


def test_median_and_mean_differ_by_a_slow_round():
  rep = report()
  rep['programs']['10'] = piece(10, slow=60.0)
  med, mean = pc.CostModel(rep, 'median'), pc.CostModel(rep, 'mean')
  steady = rep['programs']['10']['steady_round_s']
  assert med.program(10, 50, 11) - med.program(10, ROUNDS, 2) == pytest.approx(44 * later(10) + 9 * ev(10))
  assert mean.program(10, 50, 11) - mean.program(10, ROUNDS, 2) == pytest.approx(
      44 * statistics.fmean(steady) + 9 * ev(10))


def test_a_run_alone_costs_the_first_or_a_later_separate_cell():
  m = pc.CostModel(report())
  assert m.alone(True, ROUNDS, 2) == pytest.approx(90.0)
  assert m.alone(False, ROUNDS, 2) == pytest.approx(40.0)
  assert m.alone(False, 50, 11) == pytest.approx(40.0 + 44 * later(1) + 9 * ev(1))
  jobs = [pc.Job('grid', 1, ROUNDS, 2, 'a'), pc.Job('grid', 1, ROUNDS, 2, 'a'), pc.Job('grid', 1, ROUNDS, 2, 'b'),
          pc.Job('grid', 4, ROUNDS, 2, 'a')]
  assert pc.job_costs(jobs, m) == pytest.approx([90.0, 40.0, 90.0, report()['programs']['4']['wall_s']])


def test_holdout_predicts_inner_sizes_from_the_others():
  rows = pc.holdout_check(report(sizes=(1, 4, 10, 20)), 'median')
  assert [r['runs'] for r in rows] == [4, 10]
  for r in rows:
    assert r['predicted_s'] == pytest.approx(r['measured_s'])


@pytest.mark.parametrize('mend, field', [
    (lambda r: r.pop('programs'), 'programs'),
    (lambda r: r['programs']['4'].update(steady_round_s=[]), 'programs.4: steady_round_s'),
    (lambda r: r['separate'].update(per_run_s=[90.0]), 'separate.per_run_s'),
    (lambda r: r.update(programs={}), 'programs'),
    (lambda r: r['programs']['10'].pop('last_eval_s'), 'programs.10: last_eval_s'),
    (lambda r: r['separate'].update(wall_s='soon'), 'separate: wall_s'),
])
def test_bad_measurements_name_the_field(mend, field):
  rep = report()
  mend(rep)
  with pytest.raises(ValueError, match=field):
    pc.CostModel(rep, where='m.json')


def test_jobs_follow_the_protocols_grouping():
  base = load_config('studies/compare/configs/collaborate.py:pairs_reduced')
  jobs = pc.protocol_jobs(base)   # grid.runs_per_program = 10
  by = lambda stage: [j.runs for j in jobs if j.stage == stage]
  assert by('headroom') == [1]                       # the LM check
  assert by('tuning') == [8, 8, 8]   # each method's 4 trials x 2 seeds: every tuned knob is a run field
  assert by('grid') == [10] * 10                     # 100 cells, seeds-only groups of 10
  assert by('reproduce') == [10, 1] * 3              # each picked cell: its program again, then alone
  assert {j.rounds for j in jobs} == {50} and {j.evals for j in jobs} == {11}
  alone = pc.protocol_jobs(base, 1)
  assert [j.runs for j in alone] == [1] * (1 + 24 + 100 + 3)
  assert len({j.key for j in alone if j.stage == 'grid'}) == len(base.grid.methods)   # seeds are not structure


def test_projection_and_structure_differences():
  rep = report()
  same = pc.project(['studies/compare/configs/collaborate.py:pairs_reduced'], rep)
  q = same['protocols'][0]
  assert q['differs_from_measured'] == []
  assert [r['stage'] for r in q['stages']] == ['headroom', 'tuning', 'grid', 'reproduce']
  assert q['total']['alone_median_s'] == pytest.approx(sum(r['alone_median_s'] for r in q['stages']))
  assert q['extrapolated_sizes'] == []
  full = pc.project(['studies/compare/configs/collaborate.py:pairs'], rep)['protocols'][0]
  assert 'train.private_steps' in full['differs_from_measured']
  assert 'Indicative only' in pc.markdown({**same, 'protocols': [full]})


def test_main_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
  measured = tmp_path / 'runs_program.json'
  measured.write_text(json.dumps(report()))
  out = tmp_path / 'out'
  monkeypatch.setattr(sys, 'argv', ['protocol_cost.py', f'--measured={measured}', f'--out={out}'])
  pc.main()
  saved = json.loads((out / 'protocol_cost.json').read_text())
  assert saved['protocols'][0]['config'].endswith('collaborate.py:pairs_reduced')
  assert '| **total** | 128 |' in (out / 'protocol_cost.md').read_text()
  assert 'as programs, h' in capsys.readouterr().out
  monkeypatch.setattr(sys, 'argv', ['protocol_cost.py', f'--measured={tmp_path / "missing.json"}'])
  with pytest.raises(SystemExit, match='missing.json'):
    pc.main()


FAKE_RUNS_PROGRAM = '''
import json, os, subprocess, sys, time
out = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--out=')][0]
os.makedirs(out, exist_ok=True)
json.dump(json.loads(os.environ['PARTIAL']), open(os.path.join(out, 'runs_program.json'), 'w'))
piece = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])   # a piece being measured
open(os.path.join(out, 'piece.pid'), 'w').write(str(piece.pid))
time.sleep(120)
'''


def test_device_checks_runs_part_stops_its_pieces_and_projects_what_it_measured(tmp_path, monkeypatch):
  """Over its budget, the runs part ends the benchmark and the piece it is measuring, then projects the protocol
  from the sizes measured so far (runs_program.json is written after every piece)."""
  import os
  import time
  from benchmarks import device_check
  fake = tmp_path / 'fake_runs_program.py'
  fake.write_text(FAKE_RUNS_PROGRAM)
  monkeypatch.setenv('PARTIAL', json.dumps({**report(sizes=(1,)), 'complete': False}))
  mode = {'runs': dict(sizes='1,10', separate=2, rounds=ROUNDS, budget_s=4, config='unused',
                       protocols=('studies/compare/configs/collaborate.py:pairs_reduced',))}
  t0 = time.monotonic()
  got = device_check.runs(mode, str(tmp_path), script=str(fake))
  assert time.monotonic() - t0 < 60   # not held until the piece ends by itself (it holds the benchmark's pipes)
  assert 'over its budget of 4 s' in got['table'] and 'programs measured: [\'1\']' in got['table']
  assert 'From an incomplete measurement' in got['table'] and '| **total** | 128 |' in got['table']
  pid = int((tmp_path / 'runs' / 'piece.pid').read_text())
  for _ in range(50):   # killed with its process group (then reaped by init)
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      break
    time.sleep(0.1)
  else:
    raise AssertionError(f'the piece {pid} outlived the runs part')
