"""Generic FedAvg on the cohort engine, in the FedJAX style: `init` -> ServerState; `apply` = one round.

Any model given as pure functions (`loss_fn(params, batch, rng) -> (loss, metrics)` over a params
pytree) trains here with the same execution as the ML-ECS federation: the sampled clients' data are
stacked on a leading client axis, every client runs its local epochs as one function
`client_update(params, data, rng)` that `cohort_map` lifts to the cohort (vmap, chunked `lax.map`
or shard_map over a device mesh), and the server averages the clients' parameters with the MMA
weighted mean (`ml_ecs.aggregation.mean.modality_mean`, plain-FedAvg weighting) and applies the averaged update
(`server params - mean client params`, a pseudo-gradient) with its own optax optimizer (SGD at
learning rate 1 = plain FedAvg).

The client optimizer starts fresh every round (as in pfl and FedJAX). The local step is
`client_step(params, opt_state, batch, rng) -> (params, opt_state, metrics)`; one local epoch walks
the client's rows in order in batches of `batch_size` (pfl's order; `shuffle=True` permutes them
per epoch), and rows past the client's `count` (padding) carry no weight.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ml_ecs.aggregation.mean import clients_finite, mean_from_sums, modality_mean
from ml_ecs.core.cohort_map import cohort_map, cohort_sum

WEIGHTINGS = ('user', 'samples')   # pfl's WeightByUser / WeightByDatapoints


class ClientData(NamedTuple):
  """One client's rows (stacked: [C, N, ...]); rows >= count are padding."""
  x: jax.Array       # [N, ...]
  y: jax.Array       # [N]
  count: jax.Array   # int32 scalar


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ServerState:
  params: Any
  opt_state: Any
  round: jax.Array


def weighted_mean(stacked, weights: jax.Array, previous):
  """Weighted mean over the leading client axis of `stacked`: the MMA reduction with plain-FedAvg
  weighting (no modality-specific leaves); a client with a non-finite update gets weight 0, and a
  leaf with no valid client keeps `previous`. Returns (mean, number of excluded clients)."""
  return modality_mean([stacked], [weights], [jnp.zeros((weights.shape[0], 1), weights.dtype)], previous,
                       jax.tree.map(lambda _: -1, previous), modality_aware=False)


@dataclasses.dataclass(frozen=True)
class FedAvg:
  """FedAvg of a model given by `loss_fn(params, batch: ClientData-like (x, y, mask), rng) -> (loss, metrics)`."""
  loss_fn: Callable[..., tuple[jax.Array, dict]]
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  batch_size: int
  epochs: int = 1
  weighting: str = 'user'
  shuffle: bool = False
  chunk: int = 0
  mesh: Any = None

  def __post_init__(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f'weighting must be one of {WEIGHTINGS}, got {self.weighting!r}')
    if self.batch_size < 1 or self.epochs < 1:
      raise ValueError('batch_size and epochs must be >= 1')

  def init(self, params) -> ServerState:
    return ServerState(params, self.server_optimizer.init(params), jnp.zeros((), jnp.int32))

  def client_step(self, params, opt_state, batch, rng):
    """One local optimizer step on one batch `(x, y, mask)`."""
    (loss, metrics), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(params, batch, rng)
    updates, opt_state = self.client_optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {**metrics, 'loss': loss}

  def num_steps(self, rows: int) -> int:
    return self.epochs * -(-rows // self.batch_size)

  def client_update(self, params, data: ClientData, rng):
    """`epochs` local epochs over one client's rows from the broadcast `params`; returns
    (params, metrics averaged over steps)."""
    n, b = data.x.shape[0], self.batch_size
    per_epoch = -(-n // b)
    pad = per_epoch * b - n
    valid = jnp.arange(n + pad) < data.count

    def epoch_order(key):
      pos = jnp.arange(n + pad)
      if self.shuffle:   # valid rows first, in a random order; padding rows last
        pos = jnp.argsort(jnp.where(valid, jax.random.uniform(key, (n + pad,)), 2.0))
      return pos.reshape(per_epoch, b)

    keys = jax.random.split(rng, self.epochs * (per_epoch + 1)).reshape(self.epochs, per_epoch + 1)
    order = jax.vmap(lambda k: epoch_order(k[0]))(keys).reshape(-1, b)              # [steps, b]
    step_keys = keys[:, 1:].reshape(-1)
    x = jnp.concatenate([data.x, jnp.zeros((pad,) + data.x.shape[1:], data.x.dtype)]) if pad else data.x
    y = jnp.concatenate([data.y, jnp.zeros((pad,) + data.y.shape[1:], data.y.dtype)]) if pad else data.y

    def step(carry, inp):
      idx, key = inp
      params, opt_state = carry
      params, opt_state, metrics = self.client_step(params, opt_state, (x[idx], y[idx], valid[idx]), key)
      return (params, opt_state), metrics

    (params, _), metrics = jax.lax.scan(step, (params, self.client_optimizer.init(params)), (order, step_keys))
    return params, jax.tree.map(jnp.mean, metrics)

  def client_weights(self, data: ClientData) -> jax.Array:
    return (jnp.ones_like(data.count) if self.weighting == 'user' else data.count).astype(jnp.float32)

  @functools.cached_property
  def _cohort(self):
    return cohort_map(lambda data, rng, params: self.client_update(params, data, rng), 2, chunk=self.chunk,
                      mesh=self.mesh)

  @functools.cached_property
  def _cohort_sum(self):
    def one(data, rng, weight, params):
      new, metrics = self.client_update(params, data, rng)
      finite = clients_finite(jax.tree.map(lambda x: x[None], new))[0]
      weight = jnp.where(finite, weight, 0.0)
      summand = (jax.tree.map(lambda x: weight * jnp.where(finite, x, 0.0), new), weight, (~finite).astype(jnp.int32))
      return summand, metrics
    return cohort_sum(one, 3, mesh=self.mesh)

  def apply(self, state: ServerState, cohort: ClientData, rng: jax.Array) -> tuple[ServerState, dict]:
    """One round over the cohort stacked on the client axis (call inside jit). Returns the new state and
    the cohort's metrics (mean over clients) plus `excluded` (clients with a non-finite update). With
    `chunk` = 1 the clients' weighted parameters are added as they finish (`cohort_sum`) instead of stacked
    and reduced: the same weighted mean and exclusions, to float rounding, without a cohort of models in
    memory (on the pfl workload's cohort of 50, 320 MB; and with a mesh, one sum crosses devices)."""
    rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(cohort.count.shape[0]))
    if self.chunk == 1:
      (sums, total, excluded), metrics = self._cohort_sum(cohort, rngs, self.client_weights(cohort), state.params)
      mean = jax.tree.map(lambda s, prev: mean_from_sums(s, total, prev), sums, state.params)
    else:
      client_params, metrics = self._cohort(cohort, rngs, state.params)
      mean, excluded = weighted_mean(client_params, self.client_weights(cohort), state.params)
    pseudo_grad = jax.tree.map(jnp.subtract, state.params, mean)
    updates, opt_state = self.server_optimizer.update(pseudo_grad, state.opt_state, state.params)
    new = ServerState(optax.apply_updates(state.params, updates), opt_state, state.round + 1)
    return new, {**jax.tree.map(jnp.mean, metrics), 'excluded': excluded}
