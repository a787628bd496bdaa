"""What a node's local update sees besides its own state and data: the round context (typed)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AlignmentGate:
  """SE-CCL's switch of the round (ml_ecs.algorithms.ml_ecs.se_ccl): whether the warm-up is over, and the
  server's reliability, which a client compares with its own before it aligns to the server."""
  on: jax.Array            # float32 0/1
  server_loss: jax.Array   # float32 scalar


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundContext:
  """The broadcast inputs of a round's local update (the same for every client of a cohort)."""
  frozen: nnx.State                      # the frozen backbone (one copy per device, never per client)
  targets: jax.Array                     # [N_public, d] SE-CCL alignment targets
  target_valid: jax.Array                # [N_public] weight of each target (0 = none)
  ref_shared: Any = None                 # the broadcast global shared LoRA (FedProx's reference)
  alignment: AlignmentGate | None = None  # None: the method exchanges no representations
  holdout: Any = None                    # the public hold-out through the cohort's modalities (SE-CCL reliability)

  def replace(self, **changes) -> RoundContext:
    return dataclasses.replace(self, **changes)
