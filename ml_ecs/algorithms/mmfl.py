"""The multimodal-FL baseline with missing-modality handling, as in the FedMultimodal benchmark (Feng et
al., KDD 2023): a missing modality enters the fusion as zero inputs (zero-filling), training batches drop
each present modality with probability `method.modality_dropout` (ModDrop, Neverova et al., 2015; never
every modality of a row), and the shared LoRA is aggregated with FedAvg."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ml_ecs.algorithms.fedavg import PLAIN, FedAvg


@dataclasses.dataclass(frozen=True)
class MMFL(FedAvg):
  name = 'mmfl'
  fields = {**PLAIN, 'zero_fill': True, 'modality_dropout': 0.2}
  zero_fill: bool = True
  modality_dropout: float = 0.2

  @classmethod
  def from_config(cls, method) -> MMFL:
    return cls(bool(method.zero_fill), float(method.modality_dropout))

  def __post_init__(self):
    # The client programs call these only when set (ml_ecs.core.node.NodeProgram).
    object.__setattr__(self, 'input_view', self._zero_fill if self.zero_fill else None)
    object.__setattr__(self, 'batch_view', self._drop_modalities if self.modality_dropout > 0 else None)

  def _zero_fill(self, inputs, mod_mask, modalities):
    """Missing inputs become zeros that enter the fusion as if present."""
    present = lambda i, x: mod_mask[:, i].astype(bool).reshape((-1,) + (1,) * (x.ndim - 1))
    zeroed = {k: jnp.where(present(i, inputs[k]), inputs[k], 0.0) for i, k in enumerate(modalities)}
    return zeroed, jnp.ones_like(mod_mask)

  def _drop_modalities(self, batch, key, hp=None):
    """Each present modality of a training batch dropped w.p. `modality_dropout` (`hp`'s, the run's, on a run
    axis), never all of a row."""
    rate = (hp or {}).get('modality_dropout', self.modality_dropout)
    keep = jax.random.uniform(key, batch.mod_mask.shape) >= rate
    dropped = batch.mod_mask * keep
    mask = jnp.where((dropped.sum(-1, keepdims=True) > 0), dropped, batch.mod_mask)
    return dataclasses.replace(batch, mod_mask=mask)
