"""One communication round (`run_round`), the fixed skeleton every method runs:

  re-sync diverged clients -> sample -> each cohort's client update (one jitted, vmapped call, the
  method's `client_update`) -> simulated faults -> the method's aggregation of the uploads -> the
  server stage (toward the method's targets) -> metrics.

What a method decides at each step is `ml_ecs.algorithms.base.Algorithm`'s.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ml_ecs.algorithms.base import Aggregated, Uploads
from ml_ecs.algorithms.ml_ecs import mma
from ml_ecs.core import distributed, faults
from ml_ecs.core.client_store import bucket, gather_clients, pad_positions, scatter_clients
from ml_ecs.core.cohort_map import CLIENT_AXIS, client_devices
from ml_ecs.core.compile_ahead import compile_ahead
from ml_ecs.core.sampling import sample_clients
from ml_ecs.core.setup import CohortSetup, Setup
from ml_ecs.core.state import NodeState, State


@dataclasses.dataclass
class _Ledger:
  """Who did what this round (client ids), and the per-client loss terms the server heard."""
  sampled: list = dataclasses.field(default_factory=list)
  resynced: list = dataclasses.field(default_factory=list)
  dropped: list = dataclasses.field(default_factory=list)
  late: list = dataclasses.field(default_factory=list)
  diverged: list = dataclasses.field(default_factory=list)
  uploaded: list = dataclasses.field(default_factory=list)
  values: dict = dataclasses.field(default_factory=dict)

  def metrics(self) -> dict[str, Any]:
    out = {f'client/{name}': faults.finite_mean(self.values[name]) for name in sorted(self.values)}
    return {**out, 'clients/sampled': len(self.sampled), 'clients/diverged_ids': sorted(self.diverged),
            'clients/resynced_ids': sorted(self.resynced), 'faults/dropped': len(self.dropped),
            'faults/late': len(self.late), 'faults/survivors': len(self.uploaded)}


def resync(setup: Setup, c: CohortSetup, cs: NodeState, global_shared, ledger: _Ledger) -> NodeState:
  """Re-syncs the clients of a cohort that diverged last round from the global model (ml_ecs.core.faults)."""
  bad = ~distributed.to_host(faults.clients_finite(cs.trainables))   # host trees are checked on the host
  bad[c.num_real:] = False
  if not bad.any() or c.resync_fn is None:
    return cs
  ledger.resynced += c.client_ids[bad].tolist()
  if c.host:   # only the diverged rows, as one padded block
    pos = pad_positions(np.flatnonzero(bad), bucket(bad.sum(), client_devices(setup.mesh)))
    sharding = NamedSharding(setup.mesh, P(CLIENT_AXIS))
    scatter_clients(cs, pos, c.resync_fn(*gather_clients((cs.trainables, cs.opt_state), pos, sharding),
                                         jnp.ones(len(pos), bool), global_shared, pos))
    return cs
  return NodeState(*c.resync_fn(cs.trainables, cs.opt_state, jnp.asarray(bad), global_shared))


def cohort_args(setup: Setup, c: CohortSetup, cs: NodeState, sel: np.ndarray, key: jax.Array, broadcast
                ) -> tuple:
  """The arguments of cohort c's round function for the selected clients; with host state, the selected
  block, gathered onto the devices."""
  rows = (cs.trainables, cs.opt_state, c.data.train, c.data.public)
  if c.host:   # only the sampled block goes to the devices
    rows = gather_clients(rows, sel, NamedSharding(setup.mesh, P(CLIENT_AXIS)))
  return (*rows, jnp.asarray(sel), key, *broadcast[:2], setup.edge_frozen, broadcast[2], c.holdout)


def kept(c: CohortSetup, cs: NodeState, sel: np.ndarray, out) -> NodeState:
  """The cohort's state after its round `out`; with host state, the selected block's rows written back into
  the host arrays (in place)."""
  if c.host:
    scatter_clients(cs, sel, NodeState(out.trainables, out.opt_state))
    return cs
  return NodeState(out.trainables, out.opt_state)


def arrivals(setup: Setup, c: CohortSetup, out, real: np.ndarray, sel: np.ndarray, key: jax.Array,
             ledger: _Ledger) -> tuple[jax.Array, jax.Array]:
  """Simulated faults of the sampled clients: their aggregation weights [selected] and modality weights
  [selected, M] (0 for a dropped upload, discounted for a late one), and what the server heard."""
  ids = c.client_ids[real]
  factor, dropped, late = faults.draw_faults(key, len(real), setup.cfg.train)
  out_metrics, finite = distributed.to_host((out.metrics, faults.clients_finite(out.shared)))   # every process
  finite = finite[:len(real)].copy()
  for v in out_metrics.values():
    finite &= np.isfinite(v[:len(real)])
  up = factor > 0
  ledger.sampled += ids.tolist()
  ledger.dropped += ids[dropped].tolist()
  ledger.late += ids[late].tolist()
  ledger.diverged += ids[~finite].tolist()
  ledger.uploaded += ids[up].tolist()
  for name, v in out_metrics.items():
    if name.endswith('_ccl') and not name.endswith('se_ccl') and not c.program.has_ccl:
      continue   # a client with a single view has no CCL term
    ledger.values.setdefault(name, []).append(v[:len(real)][up & finite])   # what the server hears
  w = np.zeros(len(sel), np.float32)
  w[:len(real)] = setup.weights[ids] * factor
  presence = mma.rows(setup.modality_weights, ids, len(sel))
  presence[:len(real)] *= factor[:, None]          # dropped / late uploads weigh nothing (or less) here too
  return jnp.asarray(w), jnp.asarray(presence)


class RoundKeys(NamedTuple):
  """The keys of one round, from the state's `rng`."""
  rng: jax.Array          # the next round's
  key: jax.Array          # clients (folded per cohort), aggregation noise
  server: jax.Array       # the server stage
  faults: jax.Array       # simulated faults (folded per cohort)


def round_keys(state: State) -> RoundKeys:
  rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
  rng, server_key = jax.random.split(rng)
  return RoundKeys(rng, key, server_key, jax.random.fold_in(key, faults.FAULT_STREAM))


def sample(c: CohortSetup, keys: RoundKeys, k: int) -> tuple[jax.Array, np.ndarray, np.ndarray]:
  """(cohort k's key, its sampled real clients, the selected positions: sampled + padding clients)."""
  ck = jax.random.fold_in(keys.key, k)
  real = sample_clients(c.num_real, c.num_sampled, jax.random.fold_in(ck, 1))
  return ck, real, np.concatenate([real, np.arange(c.num_real, c.num_real + c.num_selected - c.num_sampled)])


def broadcast_args(setup: Setup, state: State, alignment) -> tuple:
  """What every client of a round receives (global shared LoRA, server representations, SE-CCL gate), placed
  replicated as every round places them, so rounds reuse one compilation."""
  return jax.device_put((state.global_shared, state.server_z, alignment), NamedSharding(setup.mesh, P()))


def server_args(setup: Setup, state: State, key: jax.Array, targets, has_target) -> tuple:
  """The server round function's arguments; the targets and their mask placed replicated (one compilation for
  the first round's and the later rounds' calls)."""
  return (state.server.trainables, state.server.opt_state, key,
          *jax.device_put((targets, has_target.astype(jnp.float32)), NamedSharding(setup.mesh, P())),
          setup.server_frozen, setup.public_train)


def aggregate(setup: Setup, state: State, uploads: Uploads, key: jax.Array, server_loss
              ) -> tuple[Aggregated, jax.Array, jax.Array, dict[str, Any]]:
  """The method's aggregation of the uploads and the server stage's targets: (aggregated, targets,
  has_target, target metrics). `state` needs no cohorts."""
  alg = setup.algorithm
  if setup.communicate:
    agg = alg.aggregate(setup, state, uploads, key)
  else:
    agg = Aggregated(state.global_shared, state.algorithm, (), {})
  targets, has_target, target_metrics = alg.server_targets(setup, state, uploads, agg.accepted, server_loss, key)
  return agg, targets, has_target, target_metrics


def round_metrics(setup: Setup, agg: Aggregated, target_metrics: dict, ledger: _Ledger, server_metrics: dict,
                  round_: int) -> dict[str, Any]:
  """The round's training metrics (what the server heard, aggregation, server stage, communication)."""
  metrics = {**agg.metrics, **target_metrics, **ledger.metrics()}
  metrics.update({f'server/{k}': float(v) for k, v in server_metrics.items()})
  metrics['server/diverged'] = int(not all(np.isfinite(float(v)) for v in server_metrics.values()))
  sent = np.setdiff1d(np.asarray(ledger.sampled, np.int64), np.asarray(ledger.dropped, np.int64))   # dropped: no upload
  metrics.update(setup.accounting.round_bytes(np.asarray(ledger.sampled, np.int64), setup.communicate,
                                              setup.sends_representations, sent=sent))
  metrics['round'] = round_
  return metrics


def run_round(setup: Setup, state: State) -> tuple[State, dict[str, Any]]:
  """One communication round; returns the new state and the round's training metrics.

  The cohorts' trainables and optimizer states of `state` are donated (consumed).
  """
  t0 = time.perf_counter()
  keys = round_keys(state)
  alignment, server_loss = setup.algorithm.round_context(setup, state)
  broadcast = broadcast_args(setup, state, alignment)
  server_in = functools.partial(server_args, setup, state, keys.server)   # one place for the call and its compilation
  ledger, cohorts, outs, weights, presence, rows = _Ledger(), [], [], [], [], []
  # In passes, so that no cohort waits for another's result: re-syncs (they read last round's states) and
  # samples; every cohort's update dispatched; then each cohort's result kept and what arrived (these wait
  # for that cohort alone, while the later ones run).
  synced = [resync(setup, c, cs, state.global_shared, ledger) for c, cs in zip(setup.cohorts, state.cohorts)]
  drawn = [sample(c, keys, k) for k, c in enumerate(setup.cohorts)]
  args = [cohort_args(setup, c, cs, sel, ck, broadcast) for c, cs, (ck, _, sel) in zip(setup.cohorts, synced, drawn)]
  calls = [*((c.round_fn, lambda a=a: a) for c, a in zip(setup.cohorts, args)),
           (setup.server_round_fn, lambda: server_in(state.server_z, jnp.zeros(setup.num_public, bool)))]
  for k in compile_ahead(calls):   # the first round compiles its programs together; later ones find them
    if k < len(setup.cohorts):
      outs.append(setup.cohorts[k].round_fn(*args[k]))
  for k, (c, cs, out, (_, real, sel)) in enumerate(zip(setup.cohorts, synced, outs, drawn)):
    cohorts.append(kept(c, cs, sel, out))
    w, pres = arrivals(setup, c, out, real, sel, jax.random.fold_in(keys.faults, k), ledger)
    weights.append(w), presence.append(pres), rows.append(c.client_ids[sel])
  t_cohorts = time.perf_counter()   # every cohort's update has finished (arrivals read its metrics)
  uploads = Uploads(tuple(outs), tuple(weights), tuple(presence), np.concatenate(rows))
  agg, targets, has_target, target_metrics = aggregate(setup, state, uploads, keys.key, server_loss)
  t_aggregate = time.perf_counter()
  server_tr, server_opt, server_metrics, server_z = setup.server_round_fn(*server_in(targets, has_target))
  metrics = round_metrics(setup, agg, target_metrics, ledger, server_metrics, int(state.round) + 1)
  jax.block_until_ready(server_z)
  new_state = State(cohorts=tuple(cohorts), server=NodeState(server_tr, server_opt), global_shared=agg.shared,
                    server_z=server_z, round=state.round + 1, rng=jax.random.key_data(keys.rng), algorithm=agg.state)
  t_end = time.perf_counter()
  # The round's parts (timing.jsonl): client cohorts (dispatch to their metrics on the host, re-syncs and
  # sampling included), aggregation with the server's targets (host work and what it waits for), server stage.
  metrics.update({'time/round_s': t_end - t0, 'time/cohorts_s': t_cohorts - t0,
                  'time/aggregate_s': t_aggregate - t_cohorts, 'time/server_s': t_end - t_aggregate})
  return new_state, metrics
