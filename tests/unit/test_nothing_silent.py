"""Issue 22 ("nothing silent, nothing stuck"), the parts that need no training: strict JSON, temp
names, bytes of dropped clients, the DP sampling rate, absurd inputs, did-you-mean for config fields,
the workdir lock (in-process and with a real second process), the config read from a checkpoint's
meta, and the multi-process launcher noticing a dead process."""
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest

from ml_ecs.aggregation import privacy
from ml_ecs.core import communication
from ml_ecs.data.loaders import from_arrays
from ml_ecs.run import metrics_io
from ml_ecs.run.checkpoint import Checkpointer, _abandoned_read, checkpoint_config
from ml_ecs.run.workdir_lock import WorkdirLock, WorkdirLocked

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _strict_loads(text):
  def refuse(token):
    raise ValueError(f'non-strict JSON token {token}')
  return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------------------- case 7b: strict JSON
def test_metrics_files_are_strict_json_with_null_for_non_finite(tmp_path):
  rows = [{'round': 1, 'client/loss': float('nan'), 'server/lm': np.float32(np.inf), 'ok': 0.5,
           'per': {'0': float('-inf')}, 'ids': [1, 2]}]
  path = str(tmp_path / 'metrics.jsonl')
  metrics_io.write_jsonl(path, rows)
  text = open(path).read()
  assert 'NaN' not in text and 'Infinity' not in text
  row = _strict_loads(text)
  assert row['client/loss'] is None and row['server/lm'] is None and row['per']['0'] is None
  back = metrics_io.read_jsonl(path)[0]   # in memory: NaN again, as it was written
  assert math.isnan(back['client/loss']) and back['ok'] == 0.5 and back['ids'] == [1, 2]
  metrics_io.write_json(str(tmp_path / 'summary.json'), {'x': float('nan')})
  assert _strict_loads(open(tmp_path / 'summary.json').read()) == {'x': None}
  assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


def test_temp_names_are_per_process():
  name = metrics_io.temp_name('/w/metrics.jsonl')
  assert name != '/w/metrics.jsonl.tmp' and f'.{os.getpid()}.' in name


def test_a_garbage_metrics_line_names_the_file_and_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"round": 0}\n{"round": 1, "x": \n')
  with pytest.raises(ValueError, match=r'metrics.jsonl line 2 is not JSON'):
    metrics_io.read_jsonl(str(path))


# --------------------------------------------------------------------------- case 7a: bytes sent
def test_dropped_clients_upload_nothing():
  shared, reps = np.array([100, 200, 300]), np.array([10, 20, 30])
  out = communication.round_bytes(shared, reps, np.array([0, 1, 2]), True, True, sent=np.array([], np.int64))
  assert out['comm/bytes_up'] == 0 and out['comm/bytes_down'] == 660
  out = communication.round_bytes(shared, reps, np.array([0, 2]), True, True, sent=np.array([2]))
  assert out['comm/bytes_up'] == 330 and out['comm/lora_bytes_up'] == 300 and out['comm/bytes_down'] == 440


def test_the_round_passes_the_ids_that_uploaded():
  """round.py hands round_bytes the sampled ids minus the dropped ones (not all sampled)."""
  src = open(os.path.join(ROOT, 'ml_ecs', 'core', 'round.py')).read()
  assert 'sent=sent' in src and 'ledger.dropped' in src


# --------------------------------------------------------------------------- case 5: DP sampling rate
def test_dp_accounts_at_the_sampling_rate_performed():
  # tiny: cohorts of 2 and 1 clients; client_fraction 0.001 still samples 1 of each (floor of one).
  q = privacy.sampling_rate([(1, 2), (1, 1)])
  assert q == 1.0
  assert privacy.sampling_rate([(5, 100), (1, 10)]) == pytest.approx(0.1)
  import ml_collections
  dp = ml_collections.ConfigDict(dict(noise_multiplier=1.0, delta=1e-5, accountant='rdp', noise_representations=False,
                                      repr_noise_multiplier=1.0))
  assert privacy.epsilon(dp, q, 5) > 3 * privacy.epsilon(dp, 0.001, 5)
  m = privacy.round_metrics(dp, q, 5)
  assert m['dp/sampling_rate'] == 1.0 and m['dp/epsilon'] == privacy.epsilon(dp, 1.0, 5)


# --------------------------------------------------------------------------- case 6 and 9: inputs
@pytest.mark.parametrize('value', [np.inf, -np.inf, 1e39, 1e30, -5e31])
def test_absurd_input_values_are_refused_naming_modality_and_rows(value):
  x = np.zeros((6, 4), np.float64)
  x[3, 1] = value
  x[5, 0] = value
  with pytest.raises(ValueError, match=r"modality 'gyro'.* rows 3, 5"):
    from_arrays({'gyro': x, 'accel': np.zeros((6, 2))}, np.zeros(6, int), ['a'])


def test_missing_rows_and_large_but_sane_values_still_load():
  x = np.full((4, 3), 1e20)
  x[1] = np.nan   # a missing sample
  ds = from_arrays({'gyro': x, 'accel': np.zeros((4, 2))}, np.zeros(4, int), ['a'])
  assert np.isfinite(ds.modalities['gyro']).all()


def test_a_modality_without_features_is_refused():
  with pytest.raises(ValueError, match=r"modality 'gyro' has shape \(4, 0\)"):
    from_arrays({'gyro': np.zeros((4, 0)), 'accel': np.zeros((4, 2))}, np.zeros(4, int), ['a'])


# --------------------------------------------------------------------------- case 9: unknown fields
def test_unknown_config_fields_say_did_you_mean(tiny_config):
  from ml_ecs.config.cli import unknown_field
  msg = unknown_field(tiny_config, 'train.learning_rat')
  assert 'did you mean train.learning_rate ' in msg or 'did you mean train.learning_rate?' in msg   # the closest first
  assert 'encoders is keyed by modality' in unknown_field(tiny_config, 'data.encoders.gyro')
  assert unknown_field(tiny_config, 'train.learning_rate') is None
  assert 'not a group' in unknown_field(tiny_config, 'train.rounds.x')


def test_launcher_unknown_field_is_one_error_line():
  res = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'train.py'), '--config=configs/tiny.py',
                        '--workdir=/nonexistent/never', '--config.train.learning_rat=0.1'],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  assert res.returncode == 2, res.stderr[-2000:]
  assert res.stderr.strip().splitlines() == [l for l in res.stderr.strip().splitlines() if l.startswith('error:')]
  assert 'did you mean train.learning_rate' in res.stderr and 'Traceback' not in res.stderr


# --------------------------------------------------------------------------- case 2: the lock
def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirLocked, match=rf'pid {os.getpid()} on host'):
      WorkdirLock(str(tmp_path)).acquire()
  with WorkdirLock(str(tmp_path)):   # released: free again
    pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
  """A real process takes the lock and is SIGKILLed: the file stays, naming it; the next one takes over."""
  holder = subprocess.Popen(
      [sys.executable, '-c', textwrap.dedent(f'''
          import sys, time
          from ml_ecs.run.workdir_lock import WorkdirLock
          WorkdirLock({str(tmp_path)!r}).acquire()
          print('held', flush=True)
          time.sleep(120)''')],
      stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(WorkdirLocked, match=rf'pid {holder.pid} on host'):
      WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()
  assert json.loads(open(tmp_path / '.lock').read())['pid'] == holder.pid   # stale file left behind
  said = []
  with WorkdirLock(str(tmp_path), said.append):
    assert json.loads(open(tmp_path / '.lock').read())['pid'] == os.getpid()
  assert len(said) == 1 and f'pid {holder.pid}' in said[0] and 'is gone' in said[0]


# --------------------------------------------------------------------------- case 3: config in checkpoints
def test_checkpoint_config_reads_the_newest_meta(tmp_path):
  for step, lr in ((1, 0.1), (2, 0.2)):
    os.makedirs(tmp_path / str(step) / 'meta')
    (tmp_path / str(step) / 'meta' / 'metadata').write_text(json.dumps({'config': {'lr': lr}, 'rows': []}))
  os.makedirs(tmp_path / '3' / 'meta')
  (tmp_path / '3' / 'meta' / 'metadata').write_text('{"conf')   # damaged: skipped
  assert checkpoint_config(str(tmp_path)) == (2, {'lr': 0.2})
  assert checkpoint_config(str(tmp_path / 'none')) == (None, None)


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_a_damaged_step_falls_back_with_one_warning_and_no_traceback_flood(tmp_path):
  """Orbax's failed restore leaves the step's other reads in flight; each used to print a traceback
  ('Event loop is closed', hundreds for a state of many arrays) after our warning. Without
  checkpoint._quiet_abandoned_reads this test fails on pytest's unraisable-exception warnings."""
  rng = np.random.default_rng(0)
  state = {f'x{i}': rng.normal(size=(32, 32)).astype(np.float32) for i in range(300)}
  ckpt = Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=3)
  ckpt.save(2, state, {'round': 2})
  ckpt.save(3, {k: v + 1 for k, v in state.items()}, {'round': 3})
  files = [os.path.join(d, f) for d, _, fs in os.walk(ckpt.step_dir(3)) for f in fs]
  victim = max((f for f in files if os.sep + 'state' + os.sep in f), key=os.path.getsize)
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 3)
  warnings = []
  step, restored, meta = ckpt.restore_latest_valid({k: np.zeros_like(v) for k, v in state.items()}, warnings.append)
  ckpt.close()
  time.sleep(0.5)   # reads still in flight finish
  assert step == 2 and meta['round'] == 2 and len(warnings) == 1, warnings
  np.testing.assert_array_equal(restored['x7'], state['x7'])


def test_only_abandoned_reads_are_dropped():
  """The filter drops RuntimeError('Event loop is closed') raised in call_soon_threadsafe, nothing else."""
  import asyncio

  def unraisable(fn):
    try:
      fn()
    except BaseException as e:   # noqa: BLE001
      return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__)

  loop = asyncio.new_event_loop()
  loop.close()
  assert _abandoned_read(unraisable(lambda: loop.call_soon_threadsafe(print)))

  def elsewhere():
    raise RuntimeError('Event loop is closed')
  assert not _abandoned_read(unraisable(elsewhere))
  assert not _abandoned_read(unraisable(lambda: 1 / 0))


# --------------------------------------------------------------------------- case 8b: a dead process
def test_multiprocess_launcher_stops_the_rest_when_one_dies():
  from launch import local_multiprocess
  env = dict(os.environ)
  survivor = [sys.executable, '-c', 'import time; time.sleep(60)']
  dying = [sys.executable, '-c', 'import time; time.sleep(1); raise SystemExit(7)']
  t0 = time.time()
  status = local_multiprocess.run([(survivor, env), (dying, env)], cwd=ROOT)
  assert status == 7
  assert time.time() - t0 < 30   # not the survivor's 60 s (nor Gloo's time-out)


# --------------------------------------------------------------------------- case 8a: the grid's exit status
GRID_CONFIG = '''
from configs import tiny

def get_config():
  c = tiny.get_config()
  c.grid = dict(methods=('fedavg',), missing_rates=(0.3,), num_clients=(3,), partition_seeds=(0,), train_seeds=(0,),
                modality_seed=0, last_k=1, tuned='', reproduce=0)
  return c
'''
STOPPED_CELL = '''
import sys
from absl import app
import studies.compare.run as r
from ml_ecs.config.cli import parse_flags
from ml_ecs.run.trainer import RunResult

def train(cfg, cdir, **kw):   # the cell's run, stopped by a signal after its checkpoint
  return RunResult('interrupted', [], cdir, None, sys.argv.pop())

r.train = train
app.run(r.main, flags_parser=parse_flags)
'''


@pytest.mark.parametrize('signal_name, status', [('SIGTERM', 143), ('SIGINT', 130)])
def test_compare_exits_128_plus_the_signal_after_a_stopped_cell(tmp_path, signal_name, status):
  (tmp_path / 'grid_cfg.py').write_text(GRID_CONFIG)
  (tmp_path / 'stopped.py').write_text(STOPPED_CELL)
  res = subprocess.run([sys.executable, str(tmp_path / 'stopped.py'), f'--config={tmp_path / "grid_cfg.py"}',
                        f'--workdir={tmp_path / "grid"}', signal_name], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  assert res.returncode == status, res.stdout[-2000:] + res.stderr[-2000:]


# --------------------------------------------------------------------------- own data, installed command
def test_npz_class_names_may_come_from_the_config(tmp_path):
  from ml_ecs.data.loaders import load_npz
  path = str(tmp_path / 'd.npz')
  np.savez(path, x_gyro=np.ones((4, 3)), labels=np.array([0, 1, 0, 1]))
  with pytest.raises(ValueError, match=r"no 'class_names' array \(or give data.class_names\)"):
    load_npz(path)
  assert load_npz(path, class_names=('rest', 'walk')).class_names == ('rest', 'walk')
  np.savez(path, x_gyro=np.ones((4, 3)), labels=np.array([0, 1, 0, 1]), class_names=np.array(['a', 'b']))
  with pytest.raises(ValueError, match='differ from the class_names array'):
    load_npz(path, class_names=('rest', 'walk'))


def test_packaged_configs_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
  from ml_ecs.config.cli import packaged_config
  monkeypatch.chdir(tmp_path)
  for spec in ('tiny', 'tiny.py', 'configs/tiny.py'):
    assert packaged_config(spec) == os.path.join(ROOT, 'configs', 'tiny.py')
  assert packaged_config('tiny:3').endswith(os.path.join('configs', 'tiny.py') + ':3')
  assert packaged_config('nope') == 'nope'


def test_setup_declares_the_console_entry_point():
  src = open(os.path.join(ROOT, 'setup.py')).read()
  assert "'ml-ecs-train = ml_ecs.run.train_cli:run'" in src
  # not imported here: its absl flags would clash with launch/local_multiprocess.py's in one test process
  import ast
  tree = ast.parse(open(os.path.join(ROOT, 'ml_ecs', 'run', 'train_cli.py')).read())
  assert 'run' in [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
