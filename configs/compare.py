"""Baseline/ablation grid: methods x missing rate x clients x seeds (launch/compare.py).

The missing rate is the per-device-type modality-missing rate (which modalities a
device type lacks); per-sample missingness stays at data.sample_missing_rate.
Every method gets the same data, models, rounds and local steps (no per-method tuning).

Full grid: python launch/compare.py --config=configs/compare.py --workdir=/tmp/compare
README grid: add --config.grid.num_clients=5, --config.grid.seeds=0,1
"""
import ml_collections

from configs import default
from ml_ecs.strategies import STRATEGIES


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.train.update(dict(rounds=15, eval_every=5))
  c.grid = ml_collections.ConfigDict(dict(
      methods=tuple(STRATEGIES),
      missing_rates=(0.3, 0.5, 0.7),
      num_clients=(3, 5, 10, 20),
      seeds=(0, 1, 2),
  ))
  return c
