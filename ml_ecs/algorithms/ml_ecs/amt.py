"""AMT, adaptive multimodal tuning: the local training stages and the shared/private split.

A node's trainables are {'shared', 'private', 'encoders', 'connector'} (ml_ecs.models.params).
The shared LoRA (and the modality adapters) is what MMA aggregates; the private LoRA and
its per-layer gates never leave the device; encoders and connector stay private too.
Every round a client runs
  public stage   on the public split: LM + lambda_se_ccl * SE-CCL, encoders frozen;
  private stage  on its own data:     LM + lambda_ccl * CCL (+ FedProx), everything trainable;
and the server runs one stage on the public split with LM + CCL + SE-CCL.
`method.amt = False` drops the private LoRA and gates from training (shared LoRA only).
The gates mix the two adapters per layer (`method.gates`, `Block.mix_gates`): 'convex'
(faithful default) g * shared + (1 - g) * private with g = sigmoid(logit) initialised at
sigmoid(`method.gate_init`) (0.88 for 2.0), or 'scaled' (the original 2 * sigmoid per adapter,
both 1 at init). Every stage optimizer follows `train.lr_schedule` over its own total steps
(rounds x stage steps; a client's schedule advances only in rounds it is sampled).
The server stage runs at `train.server_learning_rate` under every method (`server_learning_rate`), and
the server's gates are always the plain 'scaled' form (`ml_ecs.models.multimodal.server_model_options`):
the gate form is a client-side AMT choice, so the server is the same model under every method.

The *global* model of a client (`global_view`) is its encoders and connector with the
aggregated shared LoRA and the private LoRA off (gates forced to the shared side);
the *personalised* model is what the client trains and uses.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from ml_ecs.models import params
from ml_ecs.algorithms.ml_ecs import se_ccl
from ml_ecs.core.context import RoundContext
from ml_ecs.data.cohort_data import SplitArrays
from ml_ecs.models.decoder import SHARED_ONLY_LOGITS
from ml_ecs.core.node import NodeProgram, StageSpec, Trainables, make_optimizer, stage_hparams


@dataclasses.dataclass(frozen=True)
class Stages:
  """The static stage specs of one method config."""
  public: StageSpec
  private: StageSpec
  server: StageSpec


def server_learning_rate(train: ml_collections.ConfigDict) -> float:
  """The server stage's (peak) learning rate: `train.server_learning_rate`, one value for every method
  (configs saved before the field existed: `train.learning_rate`, as they ran)."""
  return float(train.get('server_learning_rate', train.learning_rate))


def stages(method: ml_collections.ConfigDict, train: ml_collections.ConfigDict,
           hparams_in_state: bool = False) -> Stages:
  """Client public/private and server stages of a (validated) method config. The client stages run at
  `train.learning_rate`, the server stage at `server_learning_rate(train)` (not the method's).
  `hparams_in_state`: every stage has its own optimizer whose learning rate and the method's loss weights
  and temperatures (`node.LOSS_HPARAMS`) are state (`node.make_optimizer`), not program constants."""
  communicate = bool(method.communicate)
  parts = tuple(p for p in params.TRAINABLE if method.amt or p != 'private')
  lambda_ccl = method.lambda_ccl if method.ccl != 'none' else 0.0
  lambda_se = method.lambda_se_ccl if method.se_ccl and communicate else 0.0
  reliability = bool(lambda_se) and method.se_ccl_reliability == 'lm'

  loss = stage_hparams(method) if hparams_in_state else None

  def opt(steps):   # None: the program's constant-rate optimizer
    if train.lr_schedule == 'constant' and not hparams_in_state:
      return None
    return make_optimizer(train, 0 if train.lr_schedule == 'constant' else train.rounds * steps, hparams_in_state,
                          loss)

  server_train = ml_collections.ConfigDict({**train.to_dict(), 'learning_rate': server_learning_rate(train)})
  server_total = 0 if train.lr_schedule == 'constant' else train.rounds * train.server_steps

  return Stages(
      public=StageSpec(train.public_steps, tuple(p for p in parts if p != 'encoders'), lambda_se_ccl=lambda_se,
                       optimizer=opt(train.public_steps), reliability=reliability),
      private=StageSpec(train.private_steps, parts, lambda_ccl=lambda_ccl,
                        fedprox_mu=method.fedprox_mu if communicate else 0.0, optimizer=opt(train.private_steps)),
      server=StageSpec(train.server_steps, params.TRAINABLE, lambda_ccl=lambda_ccl, lambda_se_ccl=lambda_se,
                       optimizer=make_optimizer(server_train, server_total, hparams_in_state, loss),
                       reliability=reliability,
                       learning_rate=server_learning_rate(train)))


class ClientUpdate(NamedTuple):
  """One client's round: new trainables and optimizer states, mean loss terms per stage
  ('public_*', 'private_*'), and its fused representations of its public subset."""
  trainables: Trainables
  opt_state: dict[str, Any]
  metrics: dict[str, jax.Array]
  z: jax.Array          # [N_public, d_z]
  z_valid: jax.Array    # [N_public]


def init_opt_state(program: NodeProgram, stages_: Stages, tr: Trainables) -> dict[str, Any]:
  """A client's optimizer states, one per stage (they optimise different parts)."""
  return {'public': program.init_opt(tr, stages_.public), 'private': program.init_opt(tr, stages_.private)}


def client_update(program: NodeProgram, stages_: Stages, tr: Trainables, opt_state: dict[str, Any],
                  train: SplitArrays, public: SplitArrays, key: jax.Array, ctx: RoundContext) -> ClientUpdate:
  """Public stage then private stage of one client, then its public representations.

  SE-CCL: the server's targets count with weight ctx.alignment.on (0 before the warm-up round)
  times, with reliability weighting, 1[server LM loss <= this client's LM loss], both losses on the
  public hold-out (`ctx.holdout`; without one, the client's on its labelled private data)
  (`se_ccl.client_target_weight`); metrics 'se_ccl_used' and 'reliability_lm'.
  """
  k_public, k_private = jax.random.split(key)
  metrics = {}
  if stages_.public.lambda_se_ccl and ctx.alignment is not None:
    own = (program.split_lm(tr, ctx.frozen, se_ccl.reliability_split(ctx.holdout, train))
           if stages_.public.reliability else jnp.zeros(()))
    w = se_ccl.client_target_weight(own, ctx.alignment.server_loss, ctx.alignment.on, stages_.public.reliability)
    ctx = ctx.replace(target_valid=ctx.target_valid * w)
    metrics.update(se_ccl_used=w, reliability_lm=own)
  for name, spec, split, stage_key in (('public', stages_.public, public, k_public),
                               ('private', stages_.private, train, k_private)):
    if spec.steps:
      tr, opt, m = program.run_stage(tr, opt_state[name], split, stage_key, ctx, spec)
      opt_state = {**opt_state, name: opt}
      metrics.update({f'{name}_{k}': v for k, v in m.items()})
  if 'private' in stages_.private.parts:   # AMT: the gate values after the round (telemetry)
    metrics.update(gate_values(program, tr, ctx.frozen))
  z, valid = program.encode_split(tr, ctx.frozen, public)
  return ClientUpdate(tr, opt_state, metrics, z, valid)


def gate_values(program: NodeProgram, tr: Trainables, frozen) -> dict[str, jax.Array]:
  """The mean over blocks of the AMT gates `Block.mix_gates()`: 'gate_shared' (the shared LoRA's
  weight) and 'gate_private' (the private LoRA's); reported as client/gate_shared, client/gate_private."""
  g = jnp.stack([b.mix_gates() for b in program.model(tr, frozen).backbone.blocks]).mean(0)
  return {'gate_shared': g[0], 'gate_private': g[1]}


def global_view(tr: Trainables, global_shared, gate_form: str) -> Trainables:
  """A client's (or a cohort's stacked) trainables as the global model: the aggregated shared
  LoRA broadcast in, the private LoRA zeroed and the gates set so that `Block.mix_gates()` is
  (1, 0) (`SHARED_ONLY_LOGITS[gate_form]`); encoders and connector stay the client's."""
  logits = jnp.asarray(SHARED_ONLY_LOGITS[gate_form])
  shared = jax.tree.map(lambda g, x: jnp.broadcast_to(g, x.shape), global_shared, tr['shared'])

  def private(path, x):
    is_gate = any(getattr(k, 'key', None) == 'gate' for k in path)
    return jnp.broadcast_to(logits, x.shape).astype(x.dtype) if is_gate else jnp.zeros_like(x)

  return {**tr, 'shared': shared, 'private': jax.tree_util.tree_map_with_path(private, tr['private'])}
