"""FedProx (Li et al., 2020): FedAvg plus the proximal term mu/2 ||w - w_global||^2 on the shared LoRA in
the private stage (`method.fedprox_mu`; the term is `StageSpec.fedprox_mu` of the local update)."""
from __future__ import annotations

from ml_ecs.algorithms.fedavg import PLAIN, FedAvg


class FedProx(FedAvg):
  name = 'fedprox'
  fields = {**PLAIN, 'fedprox_mu': 0.01}
