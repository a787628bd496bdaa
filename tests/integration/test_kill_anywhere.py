"""Fault injection: the main job SIGKILLed at many moments — once checkpoint 1 is final (a kill mid-run at a
known round), then at random (seeded) moments during start-up, a round, a checkpoint write, the summary —
and rerun each time, ends byte-identical to a run that was never interrupted (metrics.jsonl and
summary.json), every kill leaving a stale workdir lock that the next attempt takes over. Also
reproducibility on one machine: rounds run fresh and rounds run after a resume write the same bytes.

Two tests share the procedure: `test_killed_at_a_few_points` (the known kill and 3 random ones, part of every
suite run) and `test_killed_anywhere_and_rerun_ends_byte_identical` (the known kill and 19 random ones; about 15
minutes on 2 busy cores, so marked `exhaustive`, which the suite's default run leaves out:
`python -m pytest -m exhaustive tests` runs it). ML_ECS_KILL_POINTS overrides the 20; the random moments are
drawn from ML_ECS_KILL_SEED (default 0) over half the span the uninterrupted run took. That run
(`faulty_reference`) is shared with tests/integration/test_resume.py.
"""
import json
import os
import signal
import subprocess

import numpy as np
import pytest

from ml_ecs.run import metrics_io
from tests.main_job import faulty_command, start_and_signal
from tests.paths import ROOT, cached_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('resume')]


def _env():
  return cached_env(PYTHONPATH=ROOT)


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


def test_killed_at_a_few_points(faulty_reference, tmp_path):
  _kill_and_rerun(faulty_reference, tmp_path, 4)


def test_the_reference_run_writes_every_round_and_no_wall_clock(faulty_reference):
  rows = [json.loads(line) for line in faulty_reference[1].splitlines()]
  assert [r['round'] for r in rows] == [0, 1, 2, 3]
  assert not any(k.startswith('time/') for r in rows for k in r)   # wall-clock times live in timing.jsonl


@pytest.mark.exhaustive
def test_killed_anywhere_and_rerun_ends_byte_identical(faulty_reference, tmp_path):
  _kill_and_rerun(faulty_reference, tmp_path, int(os.environ.get('ML_ECS_KILL_POINTS', '20')))


def _kill_and_rerun(reference, tmp_path, points: int):
  """Kills the run `points` times (rerunning after each) and checks that every run ends byte-identical to the
  uninterrupted `reference` (`faulty_reference`): the first kill once checkpoint 1 is final, the others at
  seeded random moments."""
  rng = np.random.default_rng(int(os.environ.get('ML_ECS_KILL_SEED', '0')))
  _, metrics, summary, span = reference

  def check(workdir):
    assert _read(workdir / 'metrics.jsonl') == metrics.encode(), f'{workdir}/metrics.jsonl'
    assert _read(workdir / 'summary.json') == summary.encode(), f'{workdir}/summary.json'

  # The known kill: its workdir holds checkpoint 1 and no summary, so whichever attempt finishes it resumes.
  first = workdir = tmp_path / 'killed0'
  rc, out = start_and_signal(workdir, signal.SIGKILL, 1, _env())
  assert rc == -signal.SIGKILL and not (workdir / 'summary.json').exists(), out[-2000:]

  # Attempts on one workdir until an attempt outlives its moment and finishes; the finished run is
  # compared with the reference and the next attempts start a new workdir.
  kills, finished = 1, 0
  for _ in range(8 * points):   # attempts that finish before their moment count as chains, not kills
    if kills >= points:
      break
    if workdir is None:
      workdir = tmp_path / f'killed{finished}'
    proc = subprocess.Popen(faulty_command(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                            cwd=ROOT)
    try:
      # Half the reference's span: the reference compiled cold, a rerun finds the compilation cache.
      _, err = proc.communicate(timeout=rng.uniform(0.0, 0.5 * span))
      assert proc.returncode == 0, err[-3000:]
      check(workdir)
      finished, workdir = finished + 1, None
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.communicate()
      kills += 1
  assert kills >= points, f'only {kills} of {points} kills'
  if workdir is not None:   # the last one, killed: rerun to the end
    res = subprocess.run(faulty_command(workdir), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    check(workdir)
  events = [t.get('event') for t in metrics_io.read_jsonl(first / 'timing.jsonl')]
  assert 'resumed' in events, f'the run killed after checkpoint 1 was not resumed from a checkpoint: {events}'
