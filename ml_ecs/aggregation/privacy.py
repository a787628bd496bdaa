"""Privacy accounting of central DP (DP-FedAvg) with `dp-accounting`.

Each round is one sampled Gaussian mechanism on the aggregated shared LoRA (noise multiplier
z = dp.noise_multiplier), composed with a second one on the SE-CCL targets when
dp.noise_representations is on. The sampling rate q is the one the sampler actually performs,
not train.client_fraction: each cohort of n clients trains max(1, round(client_fraction * n)) of
them per round, so a client of that cohort is in a round with probability k / n, and the
guarantee (one for every client) uses the largest such rate over the cohorts
(`sampling_rate`). A cohort of one client gives q = 1 whatever client_fraction says. The
accountant models that rate as Poisson sampling of clients (the usual DP-FL approximation: our
sampler draws a fixed number per cohort; with q = 1 nothing is amplified and the bound is exact);
the metrics state it as `dp/sampling_rate`. The unit of privacy is one client (all of its data). `epsilon(cfg, rounds)` is the (epsilon, delta = dp.delta) guarantee
after `rounds` rounds, from the RDP or PLD accountant (dp.accountant).
"""
from __future__ import annotations

import functools
import math

import ml_collections


def _dp_accounting():
  """dp_accounting, imported on first use: it pulls in scipy (about 1.3 s), which a run without DP, and
  every process start of one, need not pay."""
  import dp_accounting   # pylint: disable=import-outside-toplevel
  return dp_accounting


def round_event(noise_multiplier: float, sampling_rate: float, repr_noise_multiplier: float | None = None):
  """The DpEvent of one round."""
  dp_accounting = _dp_accounting()
  mech = dp_accounting.GaussianDpEvent(noise_multiplier)
  if repr_noise_multiplier is not None:
    mech = dp_accounting.ComposedDpEvent([mech, dp_accounting.GaussianDpEvent(repr_noise_multiplier)])
  if sampling_rate >= 1.0:
    return mech
  return dp_accounting.PoissonSampledDpEvent(sampling_rate, mech)


# Integer orders: the fractional orders below 2 of the default list do not converge for q = 0.5.
RDP_ORDERS = tuple(range(2, 513))


@functools.lru_cache(maxsize=4096)
def _epsilon(noise: float, q: float, repr_noise: float | None, rounds: int, delta: float, accountant: str) -> float:
  if rounds <= 0:
    return 0.0
  if noise <= 0 or (repr_noise is not None and repr_noise <= 0):
    return math.inf
  dp_accounting = _dp_accounting()
  event = dp_accounting.SelfComposedDpEvent(round_event(noise, q, repr_noise), rounds)
  if accountant == 'pld':
    acc = dp_accounting.pld.PLDAccountant()
  else:
    acc = dp_accounting.rdp.RdpAccountant(RDP_ORDERS)
  return float(acc.compose(event).get_epsilon(delta))


def epsilon(dp: ml_collections.ConfigDict, client_fraction: float, rounds: int) -> float:
  """epsilon of (epsilon, dp.delta)-DP after `rounds` rounds (inf with noise 0)."""
  repr_noise = float(dp.repr_noise_multiplier) if dp.noise_representations else None
  return _epsilon(float(dp.noise_multiplier), float(client_fraction), repr_noise, int(rounds), float(dp.delta),
                  str(dp.accountant))


def sampling_rate(cohorts) -> float:
  """The largest per-round inclusion probability of a client, k / n over the cohorts' (k sampled of n
  real clients) pairs: the rate the accountant must use, not the configured client_fraction."""
  rates = [k / n for k, n in cohorts if n > 0]
  return float(max(rates)) if rates else 1.0


def round_metrics(dp: ml_collections.ConfigDict, client_fraction: float, rounds_done: int) -> dict[str, float]:
  """dp/epsilon (cumulative after `rounds_done` rounds), dp/epsilon_round (one round alone), dp/delta and
  dp/sampling_rate (the q they assume, Poisson sampling; pass `sampling_rate(...)` as `client_fraction`)."""
  return {'dp/epsilon': epsilon(dp, client_fraction, rounds_done), 'dp/epsilon_round': epsilon(dp, client_fraction, 1),
          'dp/delta': float(dp.delta), 'dp/sampling_rate': float(client_fraction)}
