"""Runs shared by several integration tests: each is made once per session (on the xdist worker that
runs its group, see `pytest.mark.xdist_group`) and every test that needs it asserts on the same run."""
import os
import subprocess
import sys

import pytest

from tests.paths import ROOT, cached_env


@pytest.fixture(scope='session')
def tiny_main_run(tmp_path_factory):
  """`launch/train.py --config=configs/tiny.py --config.train.rounds=2`, run once:
  (workdir, exit status, stdout + stderr). Its tests are in xdist_group('tiny_main_run')."""
  out = tmp_path_factory.mktemp('tiny_main_run') / 'run'
  cmd = [sys.executable, os.path.join(ROOT, 'launch', 'train.py'), '--config=' + os.path.join(ROOT, 'configs', 'tiny.py'),
         f'--workdir={out}', '--config.train.rounds=2', '--noprogress']
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=cached_env())
  return out, res.returncode, res.stdout, res.stderr
