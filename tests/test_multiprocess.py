"""One run on many processes (ml_ecs.core.distributed): start-up flags, placement, and 2 local CPU
processes x 2 devices against 1 process x 4 devices (same metrics, same global LoRA, each
process holding only its own clients, process 0 alone writing), killed and resumed."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch import local_multiprocess
from ml_ecs.core import distributed
from ml_ecs.config.validation import ConfigError
from tests.rows import assert_rows_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny, with 5 clients: a cohort of 4 (two on each process) and one of 1 (on process 0).
CONFIG = '''
from configs import tiny

def get_config():
  c = tiny.get_config()
  full = ('accel', 'depth', 'image')
  c.data.num_clients = 5
  c.data.modality_sets = (full, full, full, full, ('depth',))
  return c
'''
FLAGS = ['--noprogress', '--config.train.checkpoint_every=1']


# ---------------------------------------------------------------------------- start-up and placement
@pytest.mark.parametrize('flags, names', [
    (('127.0.0.1:1234', None, 0), '--num_processes'),
    ((None, 2, 0), '--coordinator_address'),
    (('127.0.0.1:1234', 2, 2), '--process_id = 2'),
    (('127.0.0.1:1234', 0, 0), '--num_processes = 0'),
    (('localhost', 2, 0), '--coordinator_address'),
])
def test_bad_startup_flags_are_named(flags, names):
  with pytest.raises(ConfigError, match=names):
    distributed.check_flags(*flags)


def test_cluster_environment_is_detected():
  assert distributed.cluster_processes({}) == 1
  assert distributed.cluster_processes({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}) == 4
  assert distributed.cluster_processes({'SLURM_NTASKS': '4'}) == 1   # not inside a job
  assert distributed.cluster_processes({'OMPI_COMM_WORLD_SIZE': '8'}) == 8
  assert distributed.cluster_processes({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}) == 4
  assert distributed.cluster_processes({'TPU_WORKER_HOSTNAMES': 'w0'}) == 1


def test_one_process_makes_no_distributed_call(monkeypatch):
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: pytest.fail('initialize called'))
  assert distributed.initialize(env={}) is False
  assert distributed.initialize(None, 1, None, env={}) is False
  assert distributed.initialize(env={'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '1'}) is False
  assert distributed.initialize(mode='off', env={'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '8'}) is False
  with pytest.raises(ConfigError, match='--distributed'):
    distributed.initialize(mode='maybe', env={})


def test_one_process_holds_every_row_and_reads_back():
  from ml_ecs.core.federation import client_mesh
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = client_mesh()
  sharding = NamedSharding(mesh, P('clients'))
  n = 2 * mesh.size
  assert distributed.local_rows(sharding, n) == slice(0, n)
  x = distributed.put_rows(np.arange(n * 3).reshape(n, 3), sharding, n)
  np.testing.assert_array_equal(distributed.to_host(x), np.arange(n * 3).reshape(n, 3))
  assert distributed.any_process(True) and not distributed.any_process(False)


def test_cohort_rows_are_the_rows_of_the_whole_cohort(tiny_config, dataset):
  """A process builds its rows of a cohort exactly as they are in the whole cohort (same padding)."""
  from ml_ecs.data.cohort_data import cohort_data
  from ml_ecs.data.partition import partition
  from ml_ecs.data.text import build_task_text
  text = build_task_text(dataset, tiny_config.text)
  part = partition(dataset, tiny_config.data)
  clients = part.cohorts()[0]
  clients = list(clients) + [clients[0]] * 3
  args = (dataset, text, clients, part.public_train_idx, tiny_config.eval.max_test_per_client)
  whole = cohort_data(*args)
  for rows in (slice(0, 2), slice(2, 4), slice(1, 3)):
    part_ = cohort_data(*args, rows=rows)
    assert part_.clients == whole.clients
    for name in ('train', 'test', 'public'):
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[rows], b),
                   getattr(whole, name), getattr(part_, name))


def test_launcher_commands():
  cmds = local_multiprocess.process_commands(3, 2, 4321, 'train.py', ['--workdir=/w'],
                                             {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --foo'})
  assert [c[0][-1] for c in cmds] == ['--process_id=0', '--process_id=1', '--process_id=2']
  argv, env = cmds[1]
  assert '--coordinator_address=127.0.0.1:4321' in argv and '--num_processes=3' in argv and '--workdir=/w' in argv
  assert env['XLA_FLAGS'] == '--foo --xla_force_host_platform_device_count=2' and env['JAX_PLATFORMS'] == 'cpu'
  with pytest.raises(ValueError, match='--devices_per_process'):
    local_multiprocess.process_commands(2, 0, 1, 't', [], {})
  assert local_multiprocess.exit_status(-9) == 137


# ---------------------------------------------------------------------------- end to end
def _env(devices: int) -> dict:
  cache = os.path.join(ROOT, '.pytest_cache', 'jax_cache')
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def _train_args(config: str, workdir: str) -> list[str]:
  return [f'--config={config}', f'--workdir={workdir}', *FLAGS]


def _start_two(config: str, workdir: str) -> list[tuple[subprocess.Popen, str]]:
  """2 processes x 2 CPU devices, each with its own output file."""
  cmds = local_multiprocess.process_commands(2, 2, local_multiprocess.free_port(),
                                             os.path.join(ROOT, 'launch', 'train.py'), _train_args(config, workdir),
                                             _env(2))
  out = []
  for i, (argv, env) in enumerate(cmds):
    path = os.path.join(os.path.dirname(workdir), f'{os.path.basename(workdir)}.process{i}.log')
    with open(path, 'w') as f:
      out.append((subprocess.Popen(argv, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT), path))
  return out


def _wait(procs, timeout=900) -> list[str]:
  texts = []
  for p, path in procs:
    p.wait(timeout=timeout)
    with open(path) as f:
      texts.append(f.read())
  for (p, _), text in zip(procs, texts):
    assert p.returncode == 0, text[-3000:]
  return texts


def _read(path) -> str:
  with open(path) as f:
    return f.read()


def _rows(workdir: str) -> list[dict]:
  return [json.loads(line) for line in _read(os.path.join(workdir, 'metrics.jsonl')).splitlines()]


def _global_shared(workdir: str, step: int) -> dict:
  """The global shared LoRA of checkpoint `step`, read onto this process's first device."""
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device) for k, m in meta.items()}
    state = ckptr.restore(path, target)
  return {k: np.asarray(v) for k, v in state.items() if k.startswith('.global_shared')}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(config path, 1 process x 4 devices workdir): the reference; its pretrained backbones are reused."""
  base = tmp_path_factory.mktemp('multiprocess')
  config = str(base / 'config_mp.py')
  with open(config, 'w') as f:
    f.write(CONFIG)
  one = str(base / 'one')
  res = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'train.py'), *_train_args(config, one)],
                       env=_env(4), cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
  return config, one


def _fresh_workdir(one: str, path) -> str:
  os.makedirs(path / 'w')
  shutil.copytree(os.path.join(one, 'backbones'), path / 'w' / 'backbones')   # no second pretraining
  return str(path / 'w')


@pytest.mark.slow
def test_two_processes_match_one_and_hold_their_own_clients(runs, tmp_path):
  config, one = runs
  workdir = _fresh_workdir(one, tmp_path)
  logs = _wait(_start_two(config, workdir))
  # The same metrics and global shared LoRA to float tolerance (XLA's CPU code for 2 and 4 devices
  # per process may sum in another order; configs/tiny.py itself gives identical bytes).
  assert_rows_close(_rows(one), _rows(workdir))
  a, b = _global_shared(one, 2), _global_shared(workdir, 2)
  assert a.keys() == b.keys() and a
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # Each process held only its own clients: disjoint, together all, both with real clients.
  hosts = [json.loads(_read(os.path.join(workdir, 'hosts', f'process_{i}.json'))) for i in range(2)]
  held = [sorted(sum(h['clients'], [])) for h in hosts]
  assert held[0] and held[1]
  assert sorted(held[0] + held[1]) == [0, 1, 2, 3, 4] and not set(held[0]) & set(held[1])
  assert hosts[0]['client_data_bytes'] == hosts[1]['client_data_bytes']   # half of the padded rows each
  # Only process 0 wrote the run's files and logs: one TensorBoard event file, no round lines from process 1.
  assert len(glob.glob(os.path.join(workdir, 'tensorboard', 'events.*'))) == 1
  ours = lambda log: re.findall(r'^(?:round |wrote |\d+ clients in )', log, re.M)   # the run's own log lines
  assert len(ours(logs[0])) == 5 and not ours(logs[1])


@pytest.mark.slow
def test_two_processes_killed_then_resumed(runs, tmp_path):
  config, one = runs
  workdir = _fresh_workdir(one, tmp_path)
  procs = _start_two(config, workdir)
  target = os.path.join(workdir, 'checkpoints', '1')
  deadline = time.time() + 900
  while not os.path.isdir(target) and all(p.poll() is None for p, _ in procs) and time.time() < deadline:
    time.sleep(0.05)
  assert all(p.poll() is None for p, _ in procs), 'the run ended before it could be killed'
  for p, _ in procs:
    p.send_signal(signal.SIGKILL)
  for p, _ in procs:
    p.wait(timeout=60)
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  logs = _wait(_start_two(config, workdir))
  assert 'resuming from round 1' in logs[0]
  assert [r['round'] for r in _rows(workdir)] == [0, 1, 2]
  assert_rows_close(_rows(one), _rows(workdir))
