"""One run on many processes (ml_ecs.core.distributed): start-up flags, cluster detection, placement of
the cohort rows, launcher commands (the runs on many processes are in tests/integration)."""
import jax
import numpy as np
import pytest

from launch import local_multiprocess
from ml_ecs.core import distributed
from ml_ecs.config.validation import ConfigError


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
