"""Issue 22 with real processes and real (tiny) runs: the workdir lock against a running job and its
stale lock after a kill, no checkpoint of a diverged round, the config checked from the checkpoints
when config.json is gone, a damaged newest step moved aside, strict JSON and honest bytes / DP rate
with dropout 0.999 and client_fraction 0.001, absurd inputs and workdir errors as one `error:` line.

One run (module fixture) serves every test: each works on a copy of its workdir."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ml_ecs.aggregation import privacy
from ml_ecs.run.checkpoint import checkpoint_steps
from tests.paths import ROOT, cached_env

# Every test works on the one module run (`run`): one xdist worker makes it.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('nothing_silent_runs')]

TRAIN = os.path.join(ROOT, 'launch', 'train.py')
# The settings: nothing is uploaded (dropout 0.999), one client sampled per cohort (0.001), DP on.
FLAGS = ['--noprogress', '--config.train.rounds=2', '--config.train.eval_every=2', '--config.train.checkpoint_every=1',
         '--config.train.keep_checkpoints=3', '--config.train.dropout_rate=0.999', '--config.train.client_fraction=0.001',
         '--config.dp.enabled=True']


def _env():
  return cached_env(PYTHONPATH=ROOT)


def _cmd(workdir, *extra, program=(TRAIN,)):
  return [sys.executable, *program, '--config=' + os.path.join(ROOT, 'configs', 'tiny.py'), f'--workdir={workdir}',
          *FLAGS, *extra]


def _run(workdir, *extra, program=(TRAIN,)):
  res = subprocess.run(_cmd(workdir, *extra, program=program), capture_output=True, text=True, timeout=900,
                       env=_env(), cwd=ROOT)
  return res.returncode, res.stdout + res.stderr, res.stderr


def _errors_only(stderr):
  """The refusal is one `error:` line and no traceback."""
  assert 'Traceback' not in stderr, stderr[-3000:]
  return [l for l in stderr.splitlines() if l.startswith('error:')]


def _read(path):
  with open(path) as f:
    return f.read()


def _copy(src, dst):
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns('backbones'))
  return str(dst)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A run that holds its workdir while a second launch is refused, is SIGKILLed after checkpoint 1
  (leaving its lock file behind) and is resumed by a third launch that takes the stale lock over."""
  workdir = str(tmp_path_factory.mktemp('run'))
  first = subprocess.Popen(_cmd(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                           cwd=ROOT)
  lock = os.path.join(workdir, '.lock')
  deadline = time.time() + 600
  while first.poll() is None and time.time() < deadline:
    try:
      if json.loads(_read(lock) or '{}').get('pid') == first.pid:
        break
    except (OSError, ValueError):
      pass
    time.sleep(0.1)
  assert first.poll() is None, first.stdout.read()[-3000:]
  t0 = time.time()
  rc, out, err = _run(workdir)   # a second process on the same workdir
  refused = (rc, _errors_only(err), time.time() - t0)
  target = os.path.join(workdir, 'checkpoints', '1')
  while not os.path.isdir(target) and first.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert first.poll() is None, first.stdout.read()[-3000:]
  first.kill()
  first.communicate()
  rc, out, _ = _run(workdir)
  assert rc == 0, out[-3000:]
  return {'workdir': workdir, 'first_pid': first.pid, 'refused': refused, 'resumed_out': out}


def test_a_second_process_is_refused_at_once_naming_the_holder(run):
  rc, errors, seconds = run['refused']
  assert rc == 2
  assert len(errors) == 1 and f"pid {run['first_pid']} on host" in errors[0] and 'one process per workdir' in errors[0]
  assert seconds < 240   # start-up and data loading, no training


def test_the_lock_of_the_killed_run_is_taken_over_and_the_run_resumed(run):
  out = run['resumed_out']
  assert f"taking over the stale lock" in out and f"pid {run['first_pid']}" in out and 'is gone' in out
  assert 'resuming from round 1' in out
  assert not glob.glob(os.path.join(run['workdir'], '*.tmp'))


def test_metrics_are_strict_json_and_bytes_count_only_uploads(run):
  def refuse(token):
    raise ValueError(token)
  rows = [json.loads(l, parse_constant=refuse) for l in _read(os.path.join(run['workdir'], 'metrics.jsonl')).splitlines()]
  trained = [r for r in rows if r['round'] > 0]
  assert trained and all(r['faults/dropped'] == r['clients/sampled'] for r in trained)
  assert all(r['comm/bytes_up'] == 0 and r['comm/bytes_down'] > 0 for r in trained)
  assert any(v is None for r in trained for v in r.values())   # the means over nobody: null, not NaN


def test_dp_epsilon_uses_the_sampling_rate_performed(run):
  summary = json.loads(_read(os.path.join(run['workdir'], 'summary.json')))
  # tiny: cohorts of 2 and 1 clients; at client_fraction 0.001 each still trains one: q = 1, not 0.001.
  assert summary['dp']['sampling_rate'] == 1.0
  from configs import tiny
  dp = tiny.get_config().dp
  assert summary['dp']['epsilon'] == pytest.approx(privacy.epsilon(dp, 1.0, 2))
  assert summary['dp']['epsilon'] > 3 * privacy.epsilon(dp, 0.001, 2)
  rows = [json.loads(l) for l in _read(os.path.join(run['workdir'], 'metrics.jsonl')).splitlines()]
  assert all(r['dp/sampling_rate'] == 1.0 for r in rows if 'dp/epsilon' in r)


DIVERGE_AT_2 = textwrap.dedent('''
    import runpy, sys
    from ml_ecs.core import federation
    real = federation.run_round
    def run_round(setup, state):   # every sampled client reported diverged at round 2
      state, row = real(setup, state)
      if row['round'] == 2:
        row['clients/diverged_ids'] = list(range(row['clients/sampled']))
      return state, row
    federation.run_round = run_round
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')
''')


def test_a_diverged_round_is_never_checkpointed(run, tmp_path):
  workdir = _copy(run['workdir'], tmp_path / 'w')
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '2'))
  os.remove(os.path.join(workdir, 'summary.json'))
  script = tmp_path / 'diverge.py'
  script.write_text(DIVERGE_AT_2)
  rc, out, err = _run(workdir, program=(str(script), TRAIN))
  assert rc == 3, out[-3000:]
  assert any('federation diverged at round 2' in l for l in _errors_only(err))
  assert checkpoint_steps(os.path.join(workdir, 'checkpoints')) == [1]   # round 2's state was not saved
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))


@pytest.mark.parametrize('finished', [True, False])
def test_a_lost_config_json_still_refuses_another_config(run, tmp_path, finished):
  workdir = _copy(run['workdir'], tmp_path / 'w')
  os.remove(os.path.join(workdir, 'config.json'))
  if not finished:
    os.remove(os.path.join(workdir, 'summary.json'))
  rc, out, err = _run(workdir, '--config.train.learning_rate=0.0123')
  errors = _errors_only(err)
  assert rc == 2, out[-3000:]
  assert len(errors) == 1 and 'train.learning_rate' in errors[0] and 'checkpoint 2' in errors[0]
  assert not os.path.exists(os.path.join(workdir, 'config.json'))


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_goes_on(run, tmp_path):
  workdir = _copy(run['workdir'], tmp_path / 'w')
  os.remove(os.path.join(workdir, 'summary.json'))
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '2', 'state', '**', '*'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'wb') as f:
        f.write(b'damaged')
  rc, out, _ = _run(workdir)
  assert rc == 0, out[-3000:]
  assert 'WARNING: checkpoint' in out and 'moved it to' in out and 'resuming from round 1' in out
  assert len(os.listdir(os.path.join(workdir, 'checkpoints_damaged'))) == 1
  assert checkpoint_steps(os.path.join(workdir, 'checkpoints')) == [1, 2]
  assert _read(os.path.join(workdir, 'metrics.jsonl')) == _read(os.path.join(run['workdir'], 'metrics.jsonl'))
  assert _read(os.path.join(workdir, 'summary.json')) == _read(os.path.join(run['workdir'], 'summary.json'))
  rc, out, _ = _run(workdir)   # and again: nothing blocks a rerun
  assert rc == 0 and 'holds a complete run' in out, out[-3000:]


def test_workdir_and_data_errors_are_one_error_line(run, tmp_path):
  finished = _copy(run['workdir'], tmp_path / 'garbage')
  with open(os.path.join(finished, 'metrics.jsonl'), 'a') as f:
    f.write('{"round": 3, "x": \n')
  rc, _, err = _run(finished)
  assert rc == 2 and any('metrics.jsonl' in l for l in _errors_only(err)), err[-3000:]
  afile = tmp_path / 'a_file'
  afile.write_text('')
  rc, _, err = _run(str(afile))
  assert rc == 2 and any('is a file' in l for l in _errors_only(err)), err[-3000:]
  # An Inf and a 1e39 in the features of an npz dataset: refused, naming the modality and the rows.
  from ml_ecs.data.embedded import load_default
  from ml_ecs.data.loaders import load_npz, save_npz
  src = str(tmp_path / 'data.npz')
  save_npz(load_default(), src)
  arrays = dict(np.load(src, allow_pickle=False))
  key = sorted(k for k in arrays if k.startswith('x_'))[0]
  arrays[key] = arrays[key].astype(np.float64)
  arrays[key][7].flat[0] = np.inf
  arrays[key][11].flat[0] = 1e39
  np.savez(src, **arrays)
  rc, _, err = _run(str(tmp_path / 'npz_run'), '--config.data.name=npz', f'--config.data.path={src}')
  errors = _errors_only(err)
  assert rc == 2 and len(errors) == 1, err[-3000:]
  assert f"'{key[2:]}'" in errors[0] and 'rows 7, 11' in errors[0]
