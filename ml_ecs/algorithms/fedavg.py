"""FedAvg over the LoRA (McMahan et al., 2017): one shared adapter, the LM loss only, the sample-weighted
mean of the clients' shared LoRA. Every part of the round is the interface's default."""
from __future__ import annotations

from ml_ecs.algorithms.base import Algorithm

# The method fields of a plain baseline: no CCL, no AMT, no SE-CCL, sample weights for every leaf.
PLAIN = dict(ccl='none', amt=False, mma_backbone='samples', mma_modality='samples', se_ccl=False,
             fedprox_mu=0.0, zero_fill=False, modality_dropout=0.0, communicate=True)


class FedAvg(Algorithm):
  name = 'fedavg'
  fields = dict(PLAIN)
