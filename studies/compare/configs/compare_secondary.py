"""The secondary grid: ML-ECS, the best baseline and local training at 3 / 10 / 20 clients
(missing rate 0.5), on the discriminating benchmark (VARIANT 'discriminating', default) or on
the embedded one with full labels (VARIANT 'embedded').

  python studies/compare/run.py --config=studies/compare/configs/compare_secondary.py:discriminating --workdir=/tmp/secondary \
      --config.grid.tuned=/tmp/compare/tuned.json --config.grid.methods=ml_ecs,BEST,local

Set `grid.methods` to the best baseline of the main grid (studies/compare/configs/compare.py) and reuse its
tuned values (`grid.tuned`): the secondary grid does no tuning of its own.
"""
import ml_collections

from configs import default
from studies.compare.configs import compare


def get_config(variant: str = 'discriminating') -> ml_collections.ConfigDict:
  if variant not in ('discriminating', 'embedded'):
    raise ValueError(f"studies/compare/configs/compare_secondary.py: variant {variant!r}, expected 'discriminating' or 'embedded'")
  c = compare.get_config()
  if variant == 'embedded':
    base = default.get_config()
    base.train.update(dict(rounds=c.train.rounds, eval_every=c.train.eval_every,
                           checkpoint_every=c.train.checkpoint_every))
    base.data.client_val_fraction = c.data.client_val_fraction
    base.grid, base.tune = c.grid, c.tune
    c = base
  c.grid.update(dict(methods=('ml_ecs', 'fedavg', 'local'), missing_rates=(0.5,), num_clients=(3, 10, 20),
                     reproduce=0))
  c.tune.trials = 0
  return c
