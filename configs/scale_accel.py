"""The main job at scale on one GPU/TPU: 10,000 clients of the synthetic source, 2% per round.

  python launch/train.py --config=configs/scale_accel.py --workdir=/tmp/ml_ecs_scale_accel

200 sampled clients per round (one vmapped block per cohort, client_chunk 32), evaluation on
256 clients drawn per round.
"""
import ml_collections

from configs import default


def get_config(num_clients: str = '10000') -> ml_collections.ConfigDict:
  c = default.get_config()
  n = int(num_clients)
  c.data.name = 'synthetic'
  c.data.num_clients = n
  c.data.synthetic_windows = 8
  c.data.public_per_client = 32
  c.train.update(dict(rounds=30, client_fraction=0.02, client_chunk=32, eval_every=10, checkpoint_every=10))
  c.eval.update(dict(max_test_per_client=16, clients_per_eval=256))
  return c
