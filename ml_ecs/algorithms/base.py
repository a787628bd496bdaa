"""The algorithm interface: what a federated method plugs into the round.

The round itself is fixed (`ml_ecs.core.round.run_round`):

  re-sync diverged clients -> sample -> each cohort's client update (one jitted, vmapped call)
  -> simulated faults -> aggregate the uploads -> server stage -> metrics

A method is an `Algorithm` and decides, at these points:

  fields          the `method` config fields it sets (its static choices: which losses, AMT, SE-CCL);
                  `ml_ecs.algorithms.registry.apply_strategy` writes them into a config
  init_client_state  a client's state beside its trainables (default: its optimizers' states)
  client_update   one client's local round, traced inside the cohort's vmap (default: AMT's public
                  stage + private stage, `ml_ecs.algorithms.ml_ecs.amt.client_update`)
  input_view,     how a client sees its inputs: before fusion, and on training batches (e.g. the
  batch_view      multimodal baseline's zero-filling and modality dropout); None = as they are
  round_context   what the clients receive besides the global shared LoRA (`RoundContext.alignment`)
  init_state      the method's own server state, kept in `State.algorithm` (and so in checkpoints)
  aggregate       the new global shared LoRA from the uploads (default: the MMA-weighted mean through
                  the configured robust / DP aggregator, `ml_ecs.aggregation.robust`)
  server_targets  the alignment targets of the server's stage (default: none)

A new method is a subclass in its own file plus one `registry.register` line; the round, `State`
and the checkpoint format do not change (tests/ has a method that registers itself from a test file).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ml_ecs.aggregation import privacy
from ml_ecs.algorithms.ml_ecs import amt
from ml_ecs.core import distributed, faults
from ml_ecs.core.context import AlignmentGate


@dataclasses.dataclass(frozen=True)
class Uploads:
  """What the sampled clients of every cohort sent this round (one entry per cohort)."""
  outs: tuple            # per cohort a `ml_ecs.core.state.CohortRound`: shared, z, z_valid, public_ids, metrics
  weights: tuple         # per cohort [selected] aggregation weight x fault factor (0: nothing arrived, padding)
  presence: tuple        # per cohort [selected, M] weights of the modality-specific leaves
  row_ids: np.ndarray    # client id of every row over the cohorts (-1: padding)

  @property
  def shared(self) -> tuple:
    return tuple(o.shared for o in self.outs)


class Aggregated(NamedTuple):
  """The aggregation of a round."""
  shared: Any            # the new global shared LoRA (what the next round broadcasts)
  state: Any             # the method's server state after the round (`State.algorithm`)
  accepted: tuple        # per cohort [selected] weights of the uploads that were used (0: rejected)
  metrics: dict


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A federated method (see the module docstring); instances are static (hashable) inside jit."""
  name: ClassVar[str] = ''
  fields: ClassVar[dict[str, Any]] = {}

  @classmethod
  def from_config(cls, method: ml_collections.ConfigDict) -> Algorithm:
    """The instance for a validated `method` config (its continuous options)."""
    del method
    return cls()

  # -------------------------------------------------------------------- client side (traced)
  def init_client_state(self, program, stages, tr) -> dict[str, Any]:
    """One client's state beside its trainables (checkpointed with the cohort, reset on re-sync): by
    default the optimizer state of each stage; a method with per-client state (e.g. control variates)
    adds its entries here and `client_update` carries them."""
    return amt.init_opt_state(program, stages, tr)

  def client_update(self, program, stages, tr, opt_state, train, public, key, ctx) -> amt.ClientUpdate:
    return amt.client_update(program, stages, tr, opt_state, train, public, key, ctx)

  input_view = None   # (inputs, mod_mask, modalities) -> (inputs, mod_mask)
  batch_view = None   # (batch, key, hp) -> batch; hp: the run's step hyperparameters on a run axis, else {}

  # -------------------------------------------------------------------- server side
  def round_context(self, setup, state) -> tuple[AlignmentGate | None, jax.Array | None]:
    """(what the clients receive besides the global LoRA, the server's reliability loss)."""
    del setup, state
    return None, None

  def init_state(self, global_shared) -> Any:
    """The method's server state at round 0 (a pytree; {} = none)."""
    del global_shared
    return {}

  def aggregate(self, setup, state, uploads: Uploads, key: jax.Array) -> Aggregated:
    """The configured aggregator over the uploads (`setup.aggregate_fn`); `key` is the round's key."""
    agg = setup.aggregate_fn(uploads.shared, uploads.weights, uploads.presence, state.global_shared,
                             jax.random.fold_in(key, faults.NOISE_STREAM))
    part, rejected, nonfinite, clipped, norms = distributed.to_host(
        (agg.participated, agg.rejected, agg.nonfinite, agg.clipped, agg.norms))
    norms = norms[part]
    metrics = {'mma/excluded': int(nonfinite.sum()), 'agg/participants': int(part.sum()),
               'agg/rejected': int(rejected.sum()), 'agg/rejected_ids': sorted(uploads.row_ids[rejected].tolist()),
               'agg/clipped': int(clipped.sum()),
               'agg/update_norm_median': float(np.median(norms)) if norms.size else 0.0,
               'agg/update_norm_max': float(norms.max()) if norms.size else 0.0}
    # MMA telemetry: per modality, the uploads that carry it and their total weight (0: no holder this round)
    pres = np.concatenate([np.asarray(p) for p in uploads.presence]) if uploads.presence else np.zeros((0, 0))
    for j, mod in enumerate(setup.modalities):
      col = pres[:, j] if pres.size else np.zeros((0,))
      metrics[f'mma/{mod}_clients'] = int((col > 0).sum())
      metrics[f'mma/{mod}_weight'] = float(col.sum())
    if setup.cfg.dp.enabled:
      # accounted at the sampling rate performed (a cohort's floor of one client raises it), not the fraction
      metrics.update(privacy.round_metrics(setup.cfg.dp, setup.sampling_rate, int(state.round) + 1))
    bounds = np.cumsum([0] + [len(w) for w in uploads.weights])
    accepted = tuple(w * jnp.asarray(part[a:b]) for w, a, b in zip(uploads.weights, bounds[:-1], bounds[1:]))
    return Aggregated(agg.shared, state.algorithm, accepted, metrics)

  def server_targets(self, setup, state, uploads: Uploads, accepted: tuple, server_loss: jax.Array | None,
                     key: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    """(targets [N_public, d], has_target [N_public] bool, metrics) of the server's alignment term;
    `server_loss` is the second value of `round_context`."""
    del uploads, accepted, server_loss, key
    return state.server_z, jnp.zeros((setup.num_public,), bool), {}
