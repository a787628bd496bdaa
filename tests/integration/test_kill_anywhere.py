"""Fault injection: the main job SIGKILLed at many random (seeded) moments — during start-up, a
round, a checkpoint write, the summary — and rerun each time, ends byte-identical to a run that
was never interrupted (metrics.jsonl and summary.json), every kill leaving a stale workdir lock
that the next attempt takes over.

Two tests share the procedure: `test_killed_at_a_few_points` (4 kills, part of every suite run) and
`test_killed_anywhere_and_rerun_ends_byte_identical` (20 kills; about 15 minutes on 2 busy cores, so marked
`exhaustive`, which the suite's default run leaves out: `python -m pytest -m exhaustive tests` runs it).
ML_ECS_KILL_POINTS overrides the 20; the moments are drawn from ML_ECS_KILL_SEED (default 0) over half the
span an uninterrupted run took.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.paths import ROOT, cached_env

pytestmark = pytest.mark.slow

FLAGS = ['--noprogress', '--config.train.rounds=3', '--config.train.eval_every=1', '--config.train.checkpoint_every=1',
         '--config.train.dropout_rate=0.2', '--config.train.straggler_rate=0.3']


def _cmd(workdir):
  return [sys.executable, os.path.join(ROOT, 'launch', 'train.py'), '--config=' + os.path.join(ROOT, 'configs', 'tiny.py'),
          f'--workdir={workdir}', *FLAGS]


def _env():
  return cached_env(PYTHONPATH=ROOT)


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


def test_killed_at_a_few_points(tmp_path):
  _kill_and_rerun(tmp_path, 4)


@pytest.mark.exhaustive
def test_killed_anywhere_and_rerun_ends_byte_identical(tmp_path):
  _kill_and_rerun(tmp_path, int(os.environ.get('ML_ECS_KILL_POINTS', '20')))


def _kill_and_rerun(tmp_path, points: int):
  """Kills the run at `points` seeded random moments (rerunning after each) and checks that every run
  ends byte-identical to an uninterrupted one."""
  rng = np.random.default_rng(int(os.environ.get('ML_ECS_KILL_SEED', '0')))
  reference = tmp_path / 'reference'
  t0 = time.time()
  res = subprocess.run(_cmd(reference), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=1800)
  span = time.time() - t0
  assert res.returncode == 0, res.stderr[-3000:]

  def check(workdir):
    for name in ('metrics.jsonl', 'summary.json'):
      assert _read(workdir / name) == _read(reference / name), f'{workdir}/{name}'

  # Attempts on one workdir until an attempt outlives its moment and finishes; the finished run is
  # compared with the reference and the next attempts start a new workdir.
  kills, finished, workdir = 0, 0, None
  for _ in range(8 * points):   # attempts that finish before their moment count as chains, not kills
    if kills >= points:
      break
    if workdir is None:
      workdir = tmp_path / f'killed{finished}'
    proc = subprocess.Popen(_cmd(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
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
    res = subprocess.run(_cmd(workdir), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    check(workdir)
