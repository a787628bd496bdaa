"""What a round changes: the federation's `State` (a registered pytree, checkpointed whole), and what one
cohort's jitted round returns."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NodeState:
  """Trainables and optimizer state of one node, or of a cohort stacked on the client axis."""
  trainables: dict
  opt_state: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
  """Everything a round changes. `rng` is raw key data (uint32), so the state checkpoints as arrays."""
  cohorts: tuple[NodeState, ...]   # client axis padded as in CohortSetup
  server: NodeState
  global_shared: nnx.State         # the aggregated shared LoRA (what the next round broadcasts)
  server_z: jax.Array              # [N_public, d_z] server representations of the public split
  round: jax.Array                 # int32 scalar: rounds completed
  rng: jax.Array                   # key data of the next round's key
  algorithm: Any = dataclasses.field(default_factory=dict)   # the method's own server state ({} = none)


class CohortRound(NamedTuple):
  """What one cohort's jitted round returns (selected clients only for the metrics and uploads)."""
  trainables: dict        # all stacked clients, the selected ones updated
  opt_state: dict
  metrics: dict           # [selected] per loss term
  shared: nnx.State       # [selected] uploaded shared LoRA
  z: jax.Array            # [selected, N, d_z] uploaded public representations
  z_valid: jax.Array      # [selected, N]
  public_ids: jax.Array   # [selected, N] public positions of z
