"""The algorithms compared by studies/compare/run.py, as overrides of the `method` config.

All run in the same round loop on the same data, models and local step budget
(public stage + private stage per round, server stage on the public split):

  local          no communication: clients train alone, the server alone on public data.
  fedavg         FedAvg over the LoRA (single shared adapter, sample weights), LM loss only.
  fedprox        fedavg + proximal term mu/2 ||w - w_global||^2 on the shared LoRA.
  mmfl           multimodal-FL baseline with missing-modality handling as in the
                 FedMultimodal benchmark (Feng et al., KDD 2023): missing modalities are
                 zero-filled into the fusion, trained with modality dropout
                 (ModDrop, Neverova et al., 2015), aggregated with FedAvg.
  ml_ecs         the full method of the paper (arXiv 2602.14107): text-anchored GRAM CCL, AMT with convex
                 gates, MMA over shared modality projections (backbone by samples, modality
                 leaves by present observations), SE-CCL through projection heads with
                 warm-up and reliability weighting.
  ml_ecs_no_ccl / _no_amt / _no_mma / _no_se_ccl   ablations, one component removed each
                 (_no_mma: plain FedAvg weights for every shared leaf).

Architecture options (modality_params) are the same for every method, so all methods
train the same models; the learning-rate schedule is `train.lr_schedule` (every method).
"""
from __future__ import annotations

from collections.abc import Iterable

import ml_collections

_PLAIN = dict(ccl='none', amt=False, mma_backbone='samples', mma_modality='samples', se_ccl=False,
              fedprox_mu=0.0, zero_fill=False, modality_dropout=0.0, communicate=True)

STRATEGIES: dict[str, dict] = {
    'local': {**_PLAIN, 'communicate': False},
    'fedavg': dict(_PLAIN),
    'fedprox': {**_PLAIN, 'fedprox_mu': 0.01},
    'mmfl': {**_PLAIN, 'zero_fill': True, 'modality_dropout': 0.2},
    'ml_ecs': dict(ccl='gram', ccl_anchor='text', amt=True, gates='convex', mma_backbone='samples',
                   mma_modality='observations', se_ccl=True, se_ccl_head='mlp', se_ccl_reliability='lm',
                   fedprox_mu=0.0, zero_fill=False, modality_dropout=0.0, communicate=True),
}
STRATEGIES['ml_ecs_no_ccl'] = {**STRATEGIES['ml_ecs'], 'ccl': 'none'}
STRATEGIES['ml_ecs_no_amt'] = {**STRATEGIES['ml_ecs'], 'amt': False}
STRATEGIES['ml_ecs_no_mma'] = {**STRATEGIES['ml_ecs'], 'mma_backbone': 'samples', 'mma_modality': 'samples'}
STRATEGIES['ml_ecs_no_se_ccl'] = {**STRATEGIES['ml_ecs'], 'se_ccl': False}


def apply_strategy(cfg: ml_collections.ConfigDict, name: str, keep: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """A copy of `cfg` whose `method` runs strategy `name`.

  How `method.name` and explicit `method.*` values combine: the strategy sets every method
  field it controls, except the fields named in `keep` (e.g. `fedprox_mu` given on the
  command line), which keep their value in `cfg`; fields the strategy does not control
  (lambda_*, tau_*) are left as they are. `strategy_overrides` names what then differs.
  """
  if name not in STRATEGIES:
    raise ValueError(f'config field method.name = {name!r}: expected one of {tuple(STRATEGIES)}')
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.method.update({k: v for k, v in STRATEGIES[name].items() if k not in set(keep)})
  out.method.name = name
  return out


def strategy_overrides(method: ml_collections.ConfigDict) -> dict:
  """The method fields whose values differ from what strategy `method.name` sets ({} = the plain strategy)."""
  fields = STRATEGIES.get(method.name, {})
  return {k: method[k] for k, v in fields.items() if k in method and method[k] != v}
