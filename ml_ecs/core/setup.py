"""The immutable part of a federation: `Setup` (config, data, models, compiled functions) and one
`CohortSetup` per structure of client."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ml_ecs.aggregation import privacy
from ml_ecs.algorithms.ml_ecs import amt
from ml_ecs.core import communication
from ml_ecs.core.node import NodeProgram
from ml_ecs.core.scoring import TextScorer
from ml_ecs.core.state import CohortRound
from ml_ecs.data.cohort_data import CohortData, SplitArrays
from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.data.partition import Partition
from ml_ecs.data.text import TaskText


@dataclasses.dataclass(frozen=True)
class CohortSetup:
  """Clients of one structure: their data on the devices, program and compiled functions.

  The client axis holds the `num_real` clients first, then zero-weight padding
  clients (copies of client 0's data, id -1) up to a multiple of the device count;
  padding never reaches aggregation or metrics. `rows`: the client positions whose data
  this process built and holds (all of them with one process; `data.clients` names all).
  """
  data: CohortData
  program: NodeProgram
  client_ids: np.ndarray    # [C_pad], -1 for padding
  num_real: int
  num_sampled: int          # real clients sampled per round
  num_selected: int         # sampled + padding, a multiple of the device count
  round_fn: Callable[..., CohortRound]
  generate_fn: Callable
  resync_fn: Callable | None = None   # re-syncs diverged clients (ml_ecs.core.faults.make_resync)
  host: bool = False        # train.host_state: state and data stay in host numpy; only the sampled block moves
  rows: slice = dataclasses.field(default_factory=lambda: slice(None))   # this process's clients
  holdout: SplitArrays | None = None   # the public hold-out through this cohort's modalities (SE-CCL reliability)


@dataclasses.dataclass(frozen=True)
class Setup:
  """The immutable part of a federation."""
  cfg: ml_collections.ConfigDict
  dataset: MultimodalDataset
  text: TaskText
  partition: Partition
  scorer: TextScorer
  modalities: tuple[str, ...]
  mesh: Mesh
  stages: amt.Stages
  edge_frozen: nnx.State           # replicated once per device, shared by every client on it
  server_frozen: nnx.State
  cohorts: tuple[CohortSetup, ...]
  server_program: NodeProgram
  public_train: SplitArrays        # the server's view (all modalities), without a client axis
  public_test: SplitArrays
  public_val: SplitArrays | None   # the server's validation split (data.client_val_fraction > 0)
  leaf_mod: Any                    # modality index per shared leaf (-1: not modality-specific)
  weights: np.ndarray              # MMA weight per client id (backbone LoRA)
  modality_weights: np.ndarray     # [clients, M] MMA weight of the modality-specific leaves
  accounting: communication.Accounting
  pretrain_info: dict
  aggregate_fn: Callable
  targets_fn: Callable
  server_round_fn: Callable
  server_generate_fn: Callable
  server_reliability_fn: Callable  # the server's SE-CCL reliability: its LM loss on a labelled split
  backbones: dict[str, Any] = dataclasses.field(default_factory=dict)   # backbones.Backbones.describe()
  model_cfgs: dict[str, Any] = dataclasses.field(default_factory=dict)  # model configs, resolved backbones
  algorithm: Any = None            # the method (ml_ecs.algorithms.base.Algorithm)
  public_holdout: SplitArrays | None = None   # the public hold-out, all modalities (SE-CCL reliability)
  execution: dict[str, Any] = dataclasses.field(default_factory=dict)   # measured choices per cohort / server

  @property
  def num_public(self) -> int:
    return len(self.partition.public_train_idx)

  @property
  def sampling_rate(self) -> float:
    """The per-round inclusion probability of a client that DP accounting uses (the largest k / n of a cohort)."""
    return privacy.sampling_rate([(c.num_sampled, c.num_real) for c in self.cohorts])

  @property
  def communicate(self) -> bool:
    return bool(self.cfg.method.communicate)

  @property
  def sends_representations(self) -> bool:
    return self.communicate and bool(self.cfg.method.se_ccl)
