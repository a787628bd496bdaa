"""Cohort execution: one function run for every client of a cohort, stacked on a leading client axis.

This is the one place that decides how a per-client function meets the hardware:
  * `chunk` = 0: one `jax.vmap` over the client axis; 1: a plain `jax.lax.map` (a scan, no vmap);
    k > 1: `jax.lax.map(..., batch_size=k)` over blocks of k vmapped clients (bounded working set,
    better cache use; benchmarks/throughput.py measures k);
  * `mesh` given, `placement='shard_map'`: the client axis is split over the mesh's 'clients'
    axis and each device runs its own block with `jax.shard_map` (no cross-device traffic);
  * `mesh` given, `placement='auto'`: no shard_map; XLA partitions the vmapped program from its
    inputs' shardings (the caller's jit in/out shardings). Kept for the benchmark: on CPU it
    all-gathers the per-client conv kernels and runs slower than one device.
Arguments are `num_client_args` stacked per-client pytrees followed by broadcast arguments
(the frozen backbone, server representations, ...), which every client sees unstacked.

`cohort_sum` runs the clients one at a time and adds one output of each into a running sum instead of
stacking it: O(one client) memory for what a server only sums (a FedAvg's weighted parameters), and with
a mesh one sum of a model's size crosses devices instead of every client's copy.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

CLIENT_AXIS = 'clients'
# The mesh axis a program of many federations splits its run axis over (ml_ecs.core.runs); absent from a
# single run's mesh. A mesh with it holds each run's clients over its CLIENT_AXIS only.
RUN_AXIS = 'runs'
PLACEMENTS = ('shard_map', 'auto')


def client_devices(mesh: Mesh) -> int:
  """How many devices a cohort's client axis is split over (a multiple of which the cohorts are padded to)."""
  return int(mesh.shape[CLIENT_AXIS])


def _client_specs(num_client_args: int, num_args: int) -> tuple:
  """shard_map in_specs: the stacked client arguments split on the client axis, the broadcast ones replicated."""
  return (P(CLIENT_AXIS),) * num_client_args + (P(),) * (num_args - num_client_args)


def cohort_map(fn: Callable[..., Any], num_client_args: int, *, chunk: int = 0, mesh: Mesh | None = None,
               placement: str = 'shard_map') -> Callable[..., Any]:
  """`fn(*client_args, *broadcast_args)` of one client, lifted to stacked client arguments.

  Returns an unjitted function of (*stacked client args, *broadcast args) whose outputs are
  stacked on the client axis; call it inside `jax.jit`.
  """
  if placement not in PLACEMENTS:
    raise ValueError(f'placement must be one of {PLACEMENTS}, got {placement!r}')
  if chunk < 0:
    raise ValueError(f'chunk must be >= 0 (0 = one vmap), got {chunk}')

  def per_client(*args):
    clients, shared = args[:num_client_args], args[num_client_args:]
    if chunk == 1:
      # Clients one at a time as a plain scan: lax.map's batch_size=1 would vmap the body over a
      # client axis of length 1, which XLA:CPU ran about 1.15x slower on the pfl workload's round
      # (benchmarks/RESULTS.md, "The CPU convolution path").
      return jax.lax.map(lambda c: fn(*c, *shared), clients)
    if chunk:
      return jax.lax.map(lambda c: fn(*c, *shared), clients, batch_size=chunk)
    return jax.vmap(lambda *c: fn(*c, *shared))(*clients)

  if mesh is None or placement == 'auto':
    return per_client

  def sharded(*args):
    specs = _client_specs(num_client_args, len(args))
    # check_vma=False: no replication types to check (no collectives, every output is per client), and
    # with the check on JAX marks every replicated value a client uses with a `pvary`, about a sixth
    # of a client round's program (tiny config: 9,377 -> 7,722 equations, about 30% less trace and
    # lowering time each cohort; metrics byte-identical).
    return jax.shard_map(per_client, mesh=mesh, in_specs=specs, out_specs=P(CLIENT_AXIS),
                         check_vma=False)(*args)

  return sharded


def cohort_sum(fn: Callable[..., tuple[Any, Any]], num_client_args: int, *, mesh: Mesh | None = None
               ) -> Callable[..., tuple[Any, Any]]:
  """`fn(*client_args, *broadcast_args) -> (summand, per_client)` of one client, run over stacked clients one
  at a time (a scan). Returns an unjitted function of (*stacked client args, *broadcast args) giving (the sum
  over clients of `summand`, `per_client` stacked on the client axis). With `mesh` each device sums its
  block of clients (shard_map) and the partial sums are added across devices (psum)."""
  def fold(*args):
    clients, shared = args[:num_client_args], args[num_client_args:]
    first = jax.tree.map(lambda x: x[0], clients)
    shapes = jax.eval_shape(lambda c: fn(*c, *shared)[0], first)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(total, c):
      summand, out = fn(*c, *shared)
      return jax.tree.map(jnp.add, total, summand), out
    return jax.lax.scan(body, zero, clients)

  if mesh is None:
    return fold

  def sharded(*args):
    specs = _client_specs(num_client_args, len(args))

    def block(*a):
      total, out = fold(*a)
      return jax.lax.psum(total, CLIENT_AXIS), out
    return jax.shard_map(block, mesh=mesh, in_specs=specs, out_specs=(P(), P(CLIENT_AXIS)),
                         check_vma=False)(*args)

  return sharded
