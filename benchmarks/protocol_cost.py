"""The comparison protocol's wall time on one machine, projected from a measurement of programs of runs on that
machine (benchmarks/runs_program.py's runs_program.json), both ways: as the protocol runs them with
`grid.runs_per_program` (programs of runs) and cell by cell.

  python benchmarks/protocol_cost.py --config=studies/compare/configs/collaborate.py:pairs_reduced \\
      --measured=benchmarks/results/runs_program_run_batch_sizes/runs_program.json --out=DIR

`--config` may be given several times (e.g. both designs); their costs add up. What is counted: every
federation the protocol trains (studies/compare/run.py), in the order it trains them: the headroom check's LM
check run, the tuning runs, the grid's cells and the reproduction check's reruns, grouped into programs as the
protocol groups them (studies/compare/grid.py: `program_groups`, `repro_picks`), each of its own length
(train.rounds, evaluated at round 0, every train.eval_every rounds and at the end). Not counted: the headroom
check's linear probes, the backbones' pretraining (cached, the same both ways) and the reports.

The cost model (`CostModel`): a measured piece's wall time is its fixed part (set-up, compilation, the first
round and the first evaluation, and whatever else the job does) plus its later rounds and its last evaluation at
their measured cost; a run of n rounds and e evaluations costs the fixed part plus n - 1 later rounds and e - 1
later evaluations. A program of R runs: the three parts interpolated linearly between the measured program sizes
(extrapolated from the nearest two outside them; the report says where). Every program pays its whole fixed
part (a rerun program's compilation-cache hits are not counted). A run alone: the first of its structure
(`ml_ecs.core.runs.program_key`) costs what the measurement's first separate cell cost, every later one the
mean of its later cells (a later cell with a new partition seed compiles for its data shapes, one with a new
training seed does not: with --separate=4 one in three of them compiles, in the grid about one in two, so this
is low). Later rounds are taken at their median and at their mean (one slow round moves
the mean), so each figure is a range. Every run is costed as a run of the measured method and configuration; the
report lists the fields in which the protocol's cells of that method differ from the measured ones, where
the projection is only indicative.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STATS = {'median': statistics.median, 'mean': statistics.fmean}
# Fields in which the measured runs differ from a protocol cell by construction (benchmarks/runs_program.py
# shortens them), not in their rounds' cost.
LENGTH_FIELDS = ('train.rounds', 'train.eval_every', 'train.checkpoint_every')


def evaluations(rounds: int, every: int) -> int:
  """How many evaluations a run of `rounds` rounds makes: round 0, every `every` rounds and the last."""
  return 1 + rounds // every + (1 if rounds % every else 0)


@dataclasses.dataclass(frozen=True)
class Job:
  """One unit the protocol trains: a program of `runs` runs (1: a run alone), each `rounds` rounds long."""
  stage: str
  runs: int
  rounds: int
  evals: int
  key: str       # the runs' structure (`ml_ecs.core.runs.program_key`)


def protocol_jobs(base, per_program: int | None = None) -> list[Job]:
  """Every job of the protocol `base` in the order studies/compare/run.py trains them, grouped `per_program`
  runs at a time (default: grid.runs_per_program; 1: cell by cell)."""
  from ml_ecs.core import runs as runs_lib
  from studies.compare import grid, headroom, tuning
  k = int(base.grid.get('runs_per_program', 1)) if per_program is None else per_program

  def job(stage, cfgs):
    return Job(stage, len(cfgs), int(cfgs[0].train.rounds),
               evaluations(int(cfgs[0].train.rounds), int(cfgs[0].train.eval_every)), runs_lib.program_key(cfgs[0]))

  def grouped(stage, cfgs):
    groups = grid.program_groups(cfgs, k) if k > 1 else [[i] for i in range(len(cfgs))]
    return [job(stage, [cfgs[i] for i in g]) for g in groups], groups

  out = [job('headroom', [headroom.lm_check_config(base)])] if base.grid.get('lm_check', False) else []
  if 'tune' in base and base.tune.trials > 0 and not base.grid.get('tuned', ''):
    out += grouped('tuning', tuning.trial_configs(base)[1])[0]
  _, cells = grid.check_grid(base)
  cell_jobs, groups = grouped('grid', cells)
  out += cell_jobs
  for i in grid.repro_picks(range(len(cells)), int(base.grid.get('reproduce', 0))):
    members = next(g for g in groups if i in g)
    if len(members) > 1:   # rerun as its program, then alone (grid.reproduce)
      out.append(job('reproduce', [cells[j] for j in members]))
    out.append(job('reproduce', [cells[i]]))
  return out


def _piece_parts(piece: dict, rounds: int, stat: str, where: str) -> tuple[float, float, float]:
  """(fixed s, later round s, later evaluation s) of a measured piece."""
  steady = piece.get('steady_round_s')
  if not isinstance(steady, list) or not steady:
    raise ValueError(f'{where}: steady_round_s: expected the later rounds\' times (measure --rounds >= 2)')
  for field in ('wall_s', 'last_eval_s'):
    if not isinstance(piece.get(field), (int, float)):
      raise ValueError(f'{where}: {field}: expected seconds, got {piece.get(field)!r}')
  later = STATS[stat](steady)
  ev = float(piece['last_eval_s'])
  return float(piece['wall_s']) - (rounds - 1) * later - ev, later, ev


def _interpolate(points: Sequence[tuple[int, float]], r: int) -> float:
  """Piecewise-linear in r through `points` (sorted by size), extended from the nearest two outside them; one
  point: constant."""
  if len(points) == 1:
    return points[0][1]
  i = next((j for j in range(1, len(points)) if r <= points[j][0]), len(points) - 1)
  (r0, y0), (r1, y1) = points[i - 1], points[i]
  return y0 + (y1 - y0) * (r - r0) / (r1 - r0)


class CostModel:
  """Seconds of a program of R runs, or of a run alone, from one runs_program.json (see the module doc)."""

  def __init__(self, report: dict, stat: str = 'median', where: str = 'runs_program.json'):
    if stat not in STATS:
      raise ValueError(f'stat={stat!r}: expected one of {sorted(STATS)}')
    for field in ('rounds', 'programs', 'separate'):
      if field not in report:
        raise ValueError(f'{where}: no {field!r}: expected the JSON that benchmarks/runs_program.py writes')
    self.rounds, self.stat = int(report['rounds']), stat
    programs = report['programs']
    if not isinstance(programs, dict) or not programs:
      raise ValueError(f'{where}: programs: expected at least one measured program size')
    parts = sorted((int(r), _piece_parts(piece, self.rounds, stat, f'{where}: programs.{r}'))
                   for r, piece in programs.items())
    # per part: [(R, value)]: the fixed part, a later round, a later evaluation
    self.parts = [[(r, v[i]) for r, v in parts] for i in range(3)]
    self.sizes = [r for r, _ in parts]
    sep = report['separate']
    each = sep.get('per_run_s') or []
    if len(each) < 2:
      raise ValueError(f'{where}: separate.per_run_s: expected the times of >= 2 separate runs')
    _, self.sep_round, self.sep_eval = _piece_parts(sep, self.rounds, stat, f'{where}: separate')
    more = (self.rounds - 1) * self.sep_round + self.sep_eval   # what a measured cell spent past its fixed part
    self.first_fixed = each[0] - more
    self.later_fixed = statistics.fmean(each[1:]) - more

  def program(self, r: int, rounds: int, evals: int) -> float:
    fixed, later, ev = (_interpolate(p, r) for p in self.parts)
    if len(self.sizes) == 1:   # one size measured: rounds and evaluations in proportion to the runs
      later, ev = later * r / self.sizes[0], ev * r / self.sizes[0]
    return fixed + (rounds - 1) * later + (evals - 1) * ev

  def alone(self, first: bool, rounds: int, evals: int) -> float:
    fixed = self.first_fixed if first else self.later_fixed
    return fixed + (rounds - 1) * self.sep_round + (evals - 1) * self.sep_eval

  def extrapolated(self, r: int) -> bool:
    return len(self.sizes) > 1 and not self.sizes[0] <= r <= self.sizes[-1]


def job_costs(jobs: Sequence[Job], model: CostModel) -> list[float]:
  """Each job's seconds, in order: a program by its size, a run alone by whether it is the first alone of its
  structure."""
  seen: set[str] = set()
  out = []
  for j in jobs:
    if j.runs > 1:
      out.append(model.program(j.runs, j.rounds, j.evals))
    else:
      out.append(model.alone(j.key not in seen, j.rounds, j.evals))
      seen.add(j.key)
  return out


def holdout_check(report: dict, stat: str) -> list[dict[str, float]]:
  """The interpolation checked on the measurement itself: each inner measured size's wall time predicted from
  the other sizes, against the measured one."""
  sizes = sorted(int(r) for r in report['programs'])
  out = []
  for r in sizes[1:-1]:
    others = dict(report, programs={k: v for k, v in report['programs'].items() if int(k) != r})
    predicted = CostModel(others, stat).program(r, int(report['rounds']), 2)
    out.append({'runs': r, 'measured_s': float(report['programs'][str(r)]['wall_s']), 'predicted_s': predicted})
  return out


def structure_differences(base, report: dict) -> list[str]:
  """Fields in which the protocol's first cell of the measured method differs from the first measured run (as
  benchmarks/runs_program.py builds it), apart from seeds, rates and length."""
  from benchmarks.runs_program import _configs
  from ml_ecs.config.identity import config_differences
  from ml_ecs.core.runs import RUN_FIELDS
  from studies.compare import grid
  method = report.get('method', 'ml_ecs')
  cells = grid.cells(base.grid)
  cell = next((c for c in cells if c[0] == method), cells[0])
  mine = grid.cell_config(base, (method,) + tuple(cell[1:]))
  theirs = _configs(argparse.Namespace(config=report['config'], method=method, rounds=int(report['rounds'])), 1)[0]
  return [f for f in config_differences(theirs.to_dict(), mine.to_dict())
          if f not in RUN_FIELDS and f not in LENGTH_FIELDS]


def project(configs: Sequence[str], report: dict, per_program: int | None = None) -> dict[str, Any]:
  """The projection of the protocols `configs` (config paths, 'file.py:variant') from `report`."""
  from ml_ecs.config.cli import load_config
  out: dict[str, Any] = {'measured': {k: report.get(k) for k in ('command', 'config', 'method', 'rounds',
                                                                     'environment', 'complete')},
                         'protocols': []}
  models = {s: CostModel(report, s) for s in STATS}
  for path in configs:
    base = load_config(os.path.join(ROOT, path))
    programs, alone = protocol_jobs(base, per_program), protocol_jobs(base, 1)
    costs = {way: {s: job_costs(jobs, m) for s, m in models.items()}
             for way, jobs in (('programs', programs), ('alone', alone))}
    stages = []
    for stage in dict.fromkeys(j.stage for j in programs + alone):
      row: dict[str, Any] = {'stage': stage,
                             'runs': sum(j.runs for j in alone if j.stage == stage),
                             'program_sizes': [j.runs for j in programs if j.stage == stage and j.runs > 1],
                             'alone_in_program_way': sum(1 for j in programs if j.stage == stage and j.runs == 1)}
      for way, jobs in (('programs', programs), ('alone', alone)):
        for s in STATS:
          row[f'{way}_{s}_s'] = sum(c for j, c in zip(jobs, costs[way][s]) if j.stage == stage)
      stages.append(row)
    total = {k: sum(r[k] for r in stages) for k in stages[0] if k.endswith('_s')}
    sizes = sorted({j.runs for j in programs if j.runs > 1})
    out['protocols'].append({
        'config': path, 'runs_per_program': per_program or int(base.grid.get('runs_per_program', 1)),
        'stages': stages, 'total': total,
        'extrapolated_sizes': [r for r in sizes if models['median'].extrapolated(r)],
        'differs_from_measured': structure_differences(base, report)})
  out['holdout'] = {s: holdout_check(report, s) for s in STATS}
  out['measured_sizes'] = models['median'].sizes
  return out


def _h(s: float) -> str:
  return f'{s / 3600:.2f}'


def markdown(p: dict[str, Any]) -> str:
  m = p['measured']
  env = m.get('environment') or {}
  lines = ['# The comparison protocol\'s wall time, projected', '',
           f"From `{m.get('command')}` ({m.get('method')} cells of `{m.get('config')}`, {m.get('rounds')} rounds; "
           f"{env.get('cpu', '?')}, {env.get('cpu_count', '?')} cores, devices {env.get('devices', '?')}, commit "
           f"{env.get('git_commit', '?')}, {env.get('time_utc', '?')}). Hours at the later rounds' median "
           '(mean); the model: benchmarks/protocol_cost.py.', '']
  if m.get('complete') is False:
    lines += [f"**From an incomplete measurement** (it stopped early): program sizes {p['measured_sizes']} only.", '']
  for q in p['protocols']:
    t = q['total']
    lines += [f"## `{q['config']}` (runs_per_program {q['runs_per_program']})", '',
              '| stage | runs | programs (sizes) | runs alone beside them | as programs, h | cell by cell, h | ratio |',
              '|---|---:|---|---:|---:|---:|---:|']
    total_row = dict(t, stage='**total**', runs=sum(r['runs'] for r in q['stages']), program_sizes=None,
                     alone_in_program_way=sum(r['alone_in_program_way'] for r in q['stages']))
    for r in q['stages'] + [total_row]:
      sizes = r['program_sizes']
      counted = ', '.join(f'{sizes.count(n)} of {n}' for n in sorted(set(sizes), reverse=True)) if sizes else ''
      shown = '' if sizes is None else f'{len(sizes)} ({counted})' if sizes else '0'
      lines.append(f"| {r['stage']} | {r['runs']} | {shown} | {r['alone_in_program_way']} | "
                   f"{_h(r['programs_median_s'])} ({_h(r['programs_mean_s'])}) | "
                   f"{_h(r['alone_median_s'])} ({_h(r['alone_mean_s'])}) | "
                   f"{r['alone_median_s'] / r['programs_median_s']:.2f}x "
                   f"({r['alone_mean_s'] / r['programs_mean_s']:.2f}x) |")
    lines.append('')
    if q['extrapolated_sizes']:
      lines.append(f"Program sizes outside the measured ones, extrapolated: {q['extrapolated_sizes']}.")
    if q['differs_from_measured']:
      shown = q['differs_from_measured']
      lines.append(f"**Indicative only:** this protocol's cells differ from the measured ones in {len(shown)} "
                   f"field(s) ({', '.join(shown[:8])}{', ...' if len(shown) > 8 else ''}), so their rounds may cost "
                   'otherwise.')
    lines.append('')
  if len(p['protocols']) > 1:
    t = {k: sum(q['total'][k] for q in p['protocols']) for k in p['protocols'][0]['total']}
    lines += [f"All {len(p['protocols'])} protocols: {_h(t['programs_median_s'])} ({_h(t['programs_mean_s'])}) h as "
              f"programs, {_h(t['alone_median_s'])} ({_h(t['alone_mean_s'])}) h cell by cell.", '']
  for s, rows in p['holdout'].items():
    if rows:
      lines.append(f'The interpolation on the measurement itself ({s} later rounds): ' + '; '.join(
          f"R = {r['runs']}: predicted {r['predicted_s']:.0f} s from the other sizes, measured {r['measured_s']:.0f} s"
          for r in rows) + '.')
  return '\n'.join(lines) + '\n'


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', action='append', default=[],
                 help='a protocol config, file.py:variant (repeatable; default collaborate.py:pairs_reduced)')
  p.add_argument('--measured', default='benchmarks/results/runs_program_run_batch_sizes/runs_program.json',
                 help="benchmarks/runs_program.py's runs_program.json, measured on the machine to project for")
  p.add_argument('--runs_per_program', type=int, default=0, help='group size (0: each config\'s grid.runs_per_program)')
  p.add_argument('--out', default='', help='directory for protocol_cost.json / .md (default: print only)')
  args = p.parse_args()
  if args.runs_per_program < 0:
    p.error('--runs_per_program >= 0')
  path = os.path.join(ROOT, args.measured)
  try:
    with open(path) as f:
      report = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SystemExit(f'--measured={args.measured}: {e}') from None
  try:
    result = project(args.config or ['studies/compare/configs/collaborate.py:pairs_reduced'], report,
                     args.runs_per_program or None)
  except ValueError as e:
    raise SystemExit(f'{args.measured}: {e}') from None
  result['command'] = 'benchmarks/protocol_cost.py ' + ' '.join(sys.argv[1:])
  text = markdown(result)
  if args.out:
    from ml_ecs.run import metrics_io
    os.makedirs(args.out, exist_ok=True)
    metrics_io.write_json(os.path.join(args.out, 'protocol_cost.json'), result)
    md = os.path.join(args.out, 'protocol_cost.md')
    tmp = metrics_io.temp_name(md)
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, md)
  print(text)


if __name__ == '__main__':
  main()
