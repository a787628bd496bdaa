"""Many processes, one simulation: start-up and placement over JAX's multi-controller runtime.

Every process runs the same program (SPMD, one process per host or per local CPU group).
`initialize` joins them through `jax.distributed` (explicit flags, or the cluster's
environment on SLURM, Open MPI and TPU pod slices); a single process makes no call and
behaves as before. The client mesh then spans every process's devices
(`jax.devices()`, ordered by process), and:
  * `local_rows` says which client rows of a cohort live on this process's devices;
  * `put_rows` turns the rows this process built into one global array (no process
    holds another's clients);
  * `replicate` places host values (frozen backbones, server state, public data) on every
    device;
  * `to_host` brings a small per-client result (metrics, tokens, flags) to every process;
  * `any_process` agrees on a flag (a stop request), `barrier` waits for all.
All traffic between processes is JAX's own (collectives inside jit, the coordination
service); nothing here opens a socket.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from ml_ecs.errors import ConfigError

# Environment variables that announce a job of several processes, and how many.
_CLUSTER_COUNTS = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')
_TPU_HOSTS = ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES')


def cluster_processes(env: Mapping[str, str]) -> int:
  """How many processes the environment's cluster announces (1 when it announces none).

  SLURM (`srun`: SLURM_NTASKS with SLURM_JOB_ID), Open MPI (`mpirun`: OMPI_COMM_WORLD_SIZE) and
  multi-host TPU VMs that export their workers (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES, as on
  GKE; a Cloud TPU VM keeps the list in its metadata server: `--distributed=on` reads it).
  """
  if 'SLURM_JOB_ID' in env and env.get('SLURM_NTASKS', '').isdigit():
    return int(env['SLURM_NTASKS'])
  if env.get('OMPI_COMM_WORLD_SIZE', '').isdigit():
    return int(env['OMPI_COMM_WORLD_SIZE'])
  for name in _TPU_HOSTS:
    if env.get(name):
      return len([h for h in env[name].split(',') if h.strip()])
  return 1


def check_flags(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
  """Raises ConfigError naming the flag when the explicit start-up flags are incomplete or out of range."""
  given = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
           '--process_id': process_id}
  if all(v is None for v in given.values()):
    return
  missing = [k for k, v in given.items() if v is None]
  if missing and not (num_processes == 1 and coordinator_address is None):
    raise ConfigError(f'{", ".join(missing)} missing: --coordinator_address, --num_processes and --process_id '
                      'are given together (or none of them: auto-detection on SLURM, Open MPI, TPU pods)')
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f'--num_processes = {num_processes}: must be >= 1')
  if process_id is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f'--process_id = {process_id}: must be in [0, {num_processes - 1}] (--num_processes = '
                      f'{num_processes})')
  if coordinator_address is not None:
    host, _, port = coordinator_address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ConfigError(f'--coordinator_address = {coordinator_address!r}: must be HOST:PORT (e.g. 10.0.0.1:1234)')


MODES = ('auto', 'on', 'off')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str = 'auto', env: Mapping[str, str] | None = None) -> bool:
  """Joins the processes of a run through `jax.distributed.initialize`; True if it did.

  Explicit flags (all three) for local CPU processes and any other cluster. Without them,
  `mode` 'auto' makes the call without arguments (JAX reads the cluster) when
  `cluster_processes` finds several processes in the environment; 'on' always makes it (JAX's
  own detection, e.g. a Cloud TPU VM's worker list from its metadata server); 'off' never.
  One process: no call, nothing changes. CPU collectives use gloo (set before the backend
  starts; it does not affect GPU or TPU). Call before anything touches a device.
  """
  if mode not in MODES:
    raise ConfigError(f'--distributed = {mode!r}: must be one of {", ".join(MODES)}')
  check_flags(coordinator_address, num_processes, process_id)
  env = os.environ if env is None else env
  explicit = coordinator_address is not None
  if explicit and mode == 'off':
    raise ConfigError('--distributed = off contradicts --coordinator_address (leave one out)')
  if not explicit and (mode == 'off' or (mode == 'auto' and (num_processes or cluster_processes(env)) <= 1)):
    return False
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  return True


def is_main() -> bool:
  """True on the process that writes the run's outputs (metrics, summary, events, logs)."""
  return jax.process_index() == 0


def local_rows(sharding: NamedSharding, n: int) -> slice:
  """The rows of an `[n, ...]` array sharded on its leading axis that this process's devices hold
  (contiguous: the client mesh orders devices by process). Every row in one process."""
  idx = sharding.addressable_devices_indices_map((n,))
  starts = sorted((s[0].start or 0, s[0].stop if s[0].stop is not None else n) for s in idx.values())
  lo, hi = starts[0][0], starts[-1][1]
  covered = sum(b - a for a, b in dict.fromkeys(starts))
  if covered != hi - lo:
    raise ValueError(f'the rows of this process are not contiguous: {starts}')
  return slice(lo, hi)


def put_rows(tree: Any, sharding: NamedSharding, n: int) -> Any:
  """Global arrays `[n, ...]` sharded on the leading axis from this process's rows (`local_rows`) of `tree`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x),
                                                                       (n,) + tuple(np.shape(x)[1:])), tree)


def replicate(tree: Any, sharding: NamedSharding) -> Any:
  """`tree` on every device of `sharding` (each process supplies the same host values)."""
  if jax.process_count() > 1:   # from host values: a device array of one process cannot move to another's
    tree = jax.tree.map(np.asarray, tree)
  return jax.device_put(tree, sharding)


def to_host(tree: Any) -> Any:
  """`tree`'s arrays as numpy arrays on every process; arrays sharded across processes are gathered
  (in one `process_allgather` for the whole tree: a collective every process calls at the same point)."""
  spread = lambda x: isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated)
  leaves, treedef = jax.tree.flatten(tree)
  gather = [x for x in leaves if spread(x)]
  if gather:
    from jax.experimental import multihost_utils
    gathered = iter(multihost_utils.process_allgather(gather, tiled=True))
    leaves = [next(gathered) if spread(x) else x for x in leaves]
  return jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (e.g. a stop request one process received)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def from_main(value: int) -> int:
  """Process 0's `value` on every process (e.g. a choice measured on each, which must agree)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.array(value, np.int32)))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
