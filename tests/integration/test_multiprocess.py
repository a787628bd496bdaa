"""One run on many processes (ml_ecs.core.distributed) end to end: 2 local CPU processes x 2 devices
against 1 process x 4 devices (same metrics, same global LoRA, each process holding only its own
clients, process 0 alone writing), killed and resumed: all checked on one killed-and-resumed two-process run."""
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
from tests.paths import ROOT, cached_env, xla_flags
from tests.rows import assert_rows_close

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
# The tests share the reference run (`runs`): one xdist worker makes it.
pytestmark = pytest.mark.xdist_group('multiprocess')


def _env(devices: int) -> dict:
  return cached_env(PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(devices))


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
def test_two_processes_killed_resumed_match_one_and_hold_their_own_clients(runs, tmp_path):
  """One two-process run (about 5 minutes on 2 cores, so one serves every check): SIGKILLed once checkpoint 1
  exists, resumed, and then equal to the one-process run."""
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
  # Only process 0 wrote the run's files and logs: at most one TensorBoard event file per start of process 0
  # (the killed one and the resumed one), no run lines from process 1.
  assert 1 <= len(glob.glob(os.path.join(workdir, 'tensorboard', 'events.*'))) <= 2
  ours = lambda log: re.findall(r'^(?:round |wrote |\d+ clients in )', log, re.M)   # the run's own log lines
  assert ours(logs[0]) and not ours(logs[1])
  assert re.search(r'^round +2 ', logs[0], re.M) and re.search(r'^wrote ', logs[0], re.M)
