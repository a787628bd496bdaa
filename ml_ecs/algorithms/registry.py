"""The registry of methods: name -> `Algorithm` class (ml_ecs.algorithms.base).

All run in the same round on the same data, models and local step budget (public stage +
private stage per round, server stage on the public split); the server's architecture is the same
under every method. Registered here:

  local          no communication: clients train alone, the server alone on public data.
  fedavg         FedAvg over the LoRA (single shared adapter, sample weights), LM loss only.
  fedprox        fedavg + proximal term mu/2 ||w - w_global||^2 on the shared LoRA.
  mmfl           multimodal-FL baseline with missing-modality handling (zero-filling + modality
                 dropout, FedAvg aggregation).
  ml_ecs         the full method (arXiv 2602.14107): text-anchored GRAM CCL, AMT with convex gates, MMA over shared
                 modality projections, SE-CCL through projection heads with warm-up and reliability.
  ml_ecs_no_ccl / _no_amt / _no_mma / _no_se_ccl   ablations, one component removed each
                 (_no_mma: plain FedAvg weights for every shared leaf).

Architecture options (modality_params) are the same for every method, so all methods train the
same models; the learning-rate schedule is `train.lr_schedule` (every method).
A new method: its own file with an `Algorithm` subclass, and one `register` call (here, or from
the user's code before the config is validated).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import ml_collections

from ml_ecs.algorithms.base import Algorithm
from ml_ecs.algorithms.fedavg import FedAvg
from ml_ecs.algorithms.fedprox import FedProx
from ml_ecs.algorithms.local import Local
from ml_ecs.algorithms.ml_ecs.algorithm import ABLATIONS, MLECS
from ml_ecs.algorithms.mmfl import MMFL

_REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
  """Adds a method under `cls.name` (usable as a class decorator); a name is registered once."""
  if not cls.name:
    raise ValueError(f'{cls.__name__}.name is empty: a registered method needs a name')
  if _REGISTRY.get(cls.name, cls) is not cls:
    raise ValueError(f'method {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})')
  _REGISTRY[cls.name] = cls
  return cls


def unregister(name: str) -> None:
  """Removes a method (tests register and remove their own)."""
  _REGISTRY.pop(name, None)


for _cls in (Local, FedAvg, FedProx, MMFL, MLECS, *ABLATIONS):
  register(_cls)


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> type[Algorithm]:
  if name not in _REGISTRY:
    raise ValueError(f'config field method.name = {name!r}: expected one of {names()}')
  return _REGISTRY[name]


def build(cfg: ml_collections.ConfigDict) -> Algorithm:
  """The algorithm instance of a validated config."""
  return get(cfg.method.name).from_config(cfg.method)


class _Fields(Mapping):
  """name -> the method fields it sets, a live view of the registry."""

  def __getitem__(self, name: str) -> dict:
    return dict(get(name).fields) if name in _REGISTRY else {}.__getitem__(name)

  def __iter__(self) -> Iterator[str]:
    return iter(_REGISTRY)

  def __len__(self) -> int:
    return len(_REGISTRY)


STRATEGIES: Mapping[str, dict] = _Fields()


def apply_strategy(cfg: ml_collections.ConfigDict, name: str, keep: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """A copy of `cfg` whose `method` runs method `name`.

  How `method.name` and explicit `method.*` values combine: the method sets every method
  field it controls, except the fields named in `keep` (e.g. `fedprox_mu` given on the
  command line), which keep their value in `cfg`; fields it does not control
  (lambda_*, tau_*) are left as they are. `strategy_overrides` names what then differs.
  """
  fields = get(name).fields
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.method.update({k: v for k, v in fields.items() if k not in set(keep)})
  out.method.name = name
  return out


def strategy_overrides(method: ml_collections.ConfigDict) -> dict:
  """The method fields whose values differ from what method `method.name` sets ({} = the plain method)."""
  fields = STRATEGIES.get(method.name, {})
  return {k: method[k] for k, v in fields.items() if k in method and method[k] != v}
