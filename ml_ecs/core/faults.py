"""Simulated faults and divergence handling of a round.

Faults (config `train.*`), drawn per sampled client from the round's key, so a resumed
run draws the same faults:
  dropout_rate     the client fails after its local training, before its upload: the server
                   receives nothing from it (no shared LoRA, no representations, no metrics).
                   Its local state keeps the training it did (a device that went offline).
  straggler_rate   the client is slow: its round takes 1 + Exp(straggler_slowdown) units of a
                   normal client's time; if that exceeds `deadline` the upload is late and is
                   dropped ('drop') or, with straggler_policy='discount', weighted by
                   deadline / time (the server waits for it and discounts it; a synchronous
                   simulation: no update is carried over to a later round).
The round goes on with the survivors; aggregation weights renormalise over them.
Metrics: faults/dropped, faults/late, faults/survivors.

Divergence: a client whose trainables hold a NaN/Inf is *diverged*. Its uploads are
excluded from aggregation and SE-CCL targets (non-finite), its metrics from every client
mean, and its id is reported (clients/diverged_ids; evaluation: client/diverged_ids). At the
start of the next round it is *re-synced*: its shared LoRA is set to the global shared LoRA,
its private parts (encoders, connector, private LoRA, gates) are re-initialised from its
round-0 initialisation key, and its optimizer states are reset (Adam moments of a NaN run are
NaN too). A round in which every sampled client diverged, or the server did, stops the run
with `FederationDiverged`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ml_ecs.aggregation import mean

# fold_in constants of the fault and DP-noise keys (far from the client positions that the
# round's cohort keys are folded with).
FAULT_STREAM = 0x7A11_0001
NOISE_STREAM = 0x7A11_0002


class FederationDiverged(RuntimeError):
  """Every sampled client of a round, or the server, has non-finite parameters."""


def draw_faults(key: jax.Array, num: int, train_cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(upload weight factor [num] in [0, 1], dropped [num] bool, late [num] bool) for one cohort's sampled clients."""
  if num == 0 or (train_cfg.dropout_rate <= 0 and train_cfg.straggler_rate <= 0):
    return np.ones(num, np.float32), np.zeros(num, bool), np.zeros(num, bool)
  k_drop, k_slow, k_time = jax.random.split(key, 3)
  dropped = np.asarray(jax.random.uniform(k_drop, (num,)) < train_cfg.dropout_rate)
  slow = np.asarray(jax.random.uniform(k_slow, (num,)) < train_cfg.straggler_rate)
  time = 1.0 + slow * np.asarray(jax.random.exponential(k_time, (num,))) * train_cfg.straggler_slowdown
  late = ~dropped & (time > train_cfg.deadline)
  factor = np.where(late, train_cfg.deadline / time if train_cfg.straggler_policy == 'discount' else 0.0, 1.0)
  return np.where(dropped, 0.0, factor).astype(np.float32), dropped, late


_clients_finite_on_device = jax.jit(mean.clients_finite)


def clients_finite(trainables):
  """[C] bool: every trainable leaf of stacked client c is finite (host trees checked on the host)."""
  if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(trainables)):
    return mean.clients_finite(trainables)
  return _clients_finite_on_device(trainables)


def tree_finite(tree) -> bool:
  return bool(all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree)))


def make_resync(model_init: Callable[[jax.Array], dict], init_opt: Callable[[dict], Any], keys: jax.Array,
                sharding=None) -> Callable:
  """A `resync(trainables, opt_state, bad [C] bool, global_shared, positions=None) -> (trainables, opt_state)`.

  `model_init(key)` gives one client's freshly initialised trainables, `init_opt(trainables)` its
  optimizer states; `keys` [C] are the cohort's round-0 initialisation keys (a client gets its own
  initialisation back); a call on a block of clients passes the block's `positions` in the cohort.
  Rows not `bad` are returned unchanged.
  """
  @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=sharding)
  def _resync(tr, opt, bad, global_shared, positions):
    fresh = jax.vmap(model_init)(keys[positions])
    if 'shared' in fresh:
      fresh = {**fresh, 'shared': jax.tree.map(lambda g, x: jnp.broadcast_to(g, x.shape), global_shared,
                                               fresh['shared'])}
    fresh_opt = jax.vmap(init_opt)(fresh)
    pick = lambda new, old: jnp.where(bad.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
    return jax.tree.map(pick, fresh, tr), jax.tree.map(pick, fresh_opt, opt)

  def resync(tr, opt, bad, global_shared, positions=None):
    return _resync(tr, opt, bad, global_shared, jnp.arange(len(keys)) if positions is None else jnp.asarray(positions))

  return resync


def check_round(metrics: dict[str, Any]) -> None:
  """Raises FederationDiverged if the round's metrics say the whole federation diverged."""
  sampled = metrics.get('clients/sampled', 0)
  diverged = len(metrics.get('clients/diverged_ids', ()))
  if sampled and diverged >= sampled:
    raise FederationDiverged(
        f"federation diverged at round {metrics['round']}: all {sampled} sampled clients have non-finite "
        'parameters (lower train.learning_rate or set train.clip_norm / aggregation.clip_norm)')
  if metrics.get('server/diverged'):
    raise FederationDiverged(
        f"federation diverged at round {metrics['round']}: the server model has non-finite parameters "
        '(lower train.learning_rate or set train.clip_norm)')


def finite_mean(values: list[np.ndarray]) -> float:
  """Mean of the finite entries (nan if none)."""
  if not values:
    return float('nan')
  v = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in values])
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else float('nan')
