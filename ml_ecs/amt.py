"""AMT, adaptive multimodal tuning: the local training stages and the shared/private split.

A node's trainables are {'shared', 'private', 'encoders', 'connector'} (ml_ecs.params).
The shared LoRA (and the modality adapters) is what MMA aggregates; the private LoRA and
its per-layer gates never leave the device; encoders and connector stay private too.
Every round a client runs
  public stage   on the public split: LM + lambda_se_ccl * SE-CCL, encoders frozen;
  private stage  on its own data:     LM + lambda_ccl * CCL (+ FedProx), everything trainable;
and the server runs one stage on the public split with LM + CCL + SE-CCL.
`method.amt = False` drops the private LoRA and gates from training (shared LoRA only).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import ml_collections

from ml_ecs import params
from ml_ecs.cohort_data import SplitArrays
from ml_ecs.node import NodeProgram, StageSpec, Trainables


@dataclasses.dataclass(frozen=True)
class Stages:
  """The static stage specs of one method config."""
  public: StageSpec
  private: StageSpec
  server: StageSpec


def stages(method: ml_collections.ConfigDict, train: ml_collections.ConfigDict) -> Stages:
  """Client public/private and server stages of a (validated) method config."""
  communicate = bool(method.communicate)
  parts = tuple(p for p in params.TRAINABLE if method.amt or p != 'private')
  lambda_ccl = method.lambda_ccl if method.ccl != 'none' else 0.0
  lambda_se = method.lambda_se_ccl if method.se_ccl and communicate else 0.0
  return Stages(
      public=StageSpec(train.public_steps, tuple(p for p in parts if p != 'encoders'), lambda_se_ccl=lambda_se),
      private=StageSpec(train.private_steps, parts, lambda_ccl=lambda_ccl,
                        fedprox_mu=method.fedprox_mu if communicate else 0.0),
      server=StageSpec(train.server_steps, params.TRAINABLE, lambda_ccl=lambda_ccl, lambda_se_ccl=lambda_se))


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
                  train: SplitArrays, public: SplitArrays, key: jax.Array, ctx: dict[str, Any]) -> ClientUpdate:
  """Public stage then private stage of one client, then its public representations."""
  k_public, k_private = jax.random.split(key)
  metrics = {}
  for name, spec, split, stage_key in (('public', stages_.public, public, k_public),
                               ('private', stages_.private, train, k_private)):
    if spec.steps:
      tr, opt, m = program.run_stage(tr, opt_state[name], split, stage_key, ctx, spec)
      opt_state = {**opt_state, name: opt}
      metrics.update({f'{name}_{k}': v for k, v in m.items()})
  z, valid = program.encode_split(tr, ctx['frozen'], public)
  return ClientUpdate(tr, opt_state, metrics, z, valid)
