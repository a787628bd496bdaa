"""The main job resumes exactly: SIGTERM, finished runs, other configs, grid cells (SIGKILL, mid-run and at
random moments, is tests/integration/test_kill_anywhere.py; the config comparison alone is in
tests/unit/test_resume.py)."""
import copy
import json
import os
import signal
import subprocess

import pytest

from studies.compare import grid as compare
from ml_ecs.run import trainer
from tests.main_job import faulty_command, start_and_signal
from tests.paths import ROOT, cached_env

# The tests share one uninterrupted run (`faulty_reference`, with tests/integration/test_kill_anywhere.py):
# one xdist worker makes it.
pytestmark = pytest.mark.xdist_group('resume')


def _env():
  return cached_env()   # reruns reuse compiled programs (JAX's persistent cache, shared with the suite)


def _run(workdir, *extra):
  res = subprocess.run(faulty_command(workdir, *extra), capture_output=True, text=True, timeout=900, env=_env(), cwd=ROOT)
  return res.returncode, res.stdout + res.stderr


def _read(path):
  with open(path) as f:
    return f.read()


@pytest.fixture
def reference(faulty_reference):
  """The uninterrupted run of the command: (workdir, metrics.jsonl text, summary.json text)."""
  return faulty_reference[:3]


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(reference, tmp_path):
  _, metrics, summary = reference
  rc, out = start_and_signal(str(tmp_path), signal.SIGTERM, 1, _env())
  assert rc == 128 + signal.SIGTERM, out[-3000:]
  assert 'Traceback' not in out
  stopped = [line for line in out.splitlines() if 'stopped by SIGTERM after round' in line]
  assert stopped, out[-3000:]
  last_round = int(stopped[0].split('after round ')[1].split(';')[0])
  assert (tmp_path / 'checkpoints' / str(last_round)).is_dir()      # saved at the end of the round it was in
  rows = [json.loads(line) for line in _read(tmp_path / 'metrics.jsonl').splitlines()]
  assert rows[-1]['round'] == last_round
  rc, out = _run(str(tmp_path))
  assert rc == 0 and f'resuming from round {last_round}' in out, out[-3000:]
  assert _read(tmp_path / 'metrics.jsonl') == metrics
  assert _read(tmp_path / 'summary.json') == summary


@pytest.mark.slow
def test_finished_run_is_kept_other_config_refused_overwrite_restarts(reference, tmp_path):
  import shutil
  workdir, metrics, _ = reference
  workdir = shutil.copytree(workdir, str(tmp_path / 'copy'))   # the reference stays for the other tests
  rc, out = _run(workdir)
  assert rc == 0 and 'holds a complete run' in out
  assert _read(os.path.join(workdir, 'metrics.jsonl')) == metrics
  rc, out = _run(workdir, '--config.train.batch_size=4', '--config.method.lambda_ccl=0.5')
  assert rc == 2 and 'method.lambda_ccl, train.batch_size' in out and 'Traceback' not in out
  assert _read(os.path.join(workdir, 'metrics.jsonl')) == metrics
  rc, out = _run(workdir, '--config.train.rounds=1', '--overwrite')
  assert rc == 0, out[-3000:]
  rows = [json.loads(line) for line in _read(os.path.join(workdir, 'metrics.jsonl')).splitlines()]
  assert [r['round'] for r in rows] == [0, 1] and 'resuming' not in out


def test_bad_config_is_refused_before_anything_is_written(tmp_path):
  rc, out = _run(str(tmp_path), '--config.train.eval_every=0')
  assert rc == 2 and 'train.eval_every = 0' in out and 'Traceback' not in out
  assert not (tmp_path / 'config.json').exists()


@pytest.mark.slow
def test_grid_resumes_inside_a_cell(tiny_config, dataset, tmp_path):
  """SIGTERM during a cell stops the grid after that round; the next call resumes the cell from its checkpoint."""
  base = copy.deepcopy(tiny_config)
  base.train.update(dict(rounds=3, eval_every=3, checkpoint_every=1))
  base.grid = dict(methods=('fedavg',), missing_rates=(0.3,), num_clients=(3,), partition_seeds=(0,),
                   train_seeds=(0,), modality_seed=-1, last_k=1, tuned='', reproduce=0)
  logs = []

  def run_cell(cfg, cdir, cache, stop_after=None):
    def log(line):
      logs.append(line)
      if stop_after is not None and line.startswith(f'round {stop_after:>3}'):
        os.kill(os.getpid(), signal.SIGTERM)   # handled by the trainer: stop after this round
    return trainer.train(cfg, cdir, progress=False, cache_dir=cache, log=log).status != 'interrupted'

  first = compare.run_grid(base, str(tmp_path), lambda c, d, k: run_cell(c, d, k, stop_after=1), log=logs.append)
  assert first == [] and any('grid stopped in' in line for line in logs)
  logs.clear()
  results = compare.run_grid(base, str(tmp_path), run_cell, log=logs.append)
  assert len(results) == 1 and results[0]['rounds'] == 3
  assert any(line.startswith('resuming from round 1') for line in logs)
  assert not any(line.startswith('round   1') for line in logs)   # round 1 was not redone


@pytest.mark.slow
def test_tensorboard_events_hold_the_metrics_of_the_run(reference):
  """The main job's event files (read with TensorBoard's own reader) hold every scalar of metrics.jsonl."""
  ea_mod = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
  from ml_ecs.run.metric_writer import flatten_row
  workdir, metrics, _ = reference
  acc = ea_mod.EventAccumulator(os.path.join(workdir, 'tensorboard'), size_guidance={ea_mod.SCALARS: 0})
  acc.Reload()
  tags = set(acc.Tags()['scalars'])
  rows = [json.loads(line) for line in metrics.splitlines()]
  for row in rows:
    scalars, _ = flatten_row({k: v for k, v in row.items() if k != 'round'})
    for tag, value in scalars.items():
      assert tag in tags, tag
      events = {e.step: e.value for e in acc.Scalars(tag)}
      assert events[row['round']] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, row['round'])
  assert 'time/round_s' in tags and 'client/rougeLsum/0' in tags
