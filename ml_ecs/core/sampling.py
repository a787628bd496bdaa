"""Client sampling: how many clients of a cohort a round trains, and which."""
from __future__ import annotations

import jax
import numpy as np


def sampled_count(fraction: float, num_clients: int) -> int:
  """Clients of a cohort of `num_clients` sampled per round at `train.client_fraction` (at least one)."""
  return max(1, int(round(fraction * num_clients)))


def sample_clients(num_real: int, num_sampled: int, key: jax.Array) -> np.ndarray:
  """Sorted positions of the real clients a cohort trains this round (without replacement)."""
  return np.sort(np.asarray(jax.random.choice(key, num_real, (num_sampled,), replace=False)))
