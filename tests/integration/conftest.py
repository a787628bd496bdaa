"""Runs shared by several integration tests: each is made once per session (on the xdist worker that
runs its group, see `pytest.mark.xdist_group`) and every test that needs it asserts on the same run."""
import subprocess
import time

import pytest

from tests.main_job import command, faulty_command
from tests.paths import ROOT, cached_env


@pytest.fixture(scope='session')
def tiny_main_run(tmp_path_factory):
  """`launch/train.py --config=configs/tiny.py --config.train.rounds=2`, run once:
  (workdir, exit status, stdout + stderr). Its tests are in xdist_group('tiny_main_run')."""
  out = tmp_path_factory.mktemp('tiny_main_run') / 'run'
  cmd = command(out, '--config.train.rounds=2', '--noprogress')
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=cached_env())
  return out, res.returncode, res.stdout, res.stderr


@pytest.fixture(scope='session')
def faulty_reference(tmp_path_factory):
  """`tests.main_job.faulty_command` run once, uninterrupted: (workdir, metrics.jsonl text, summary.json text,
  seconds it took). Its tests (tests/integration/test_resume.py, test_kill_anywhere.py) are in
  xdist_group('resume')."""
  workdir = tmp_path_factory.mktemp('faulty_reference')
  t0 = time.time()
  res = subprocess.run(faulty_command(workdir), capture_output=True, text=True, timeout=900, cwd=ROOT, env=cached_env())
  seconds = time.time() - t0
  assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
  read = lambda name: (workdir / name).read_text()
  return str(workdir), read('metrics.jsonl'), read('summary.json'), seconds
