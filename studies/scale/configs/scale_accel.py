"""The main job at scale on one GPU/TPU: 10,000 clients of the synthetic source, 2% per round.

  python launch/train.py --config=studies/scale/configs/scale_accel.py --workdir=/tmp/ml_ecs_scale_accel

studies/scale/configs/scale_cpu.py at 10,000 clients: 200 sampled clients per round (host_state, one
vmapped block per cohort, client_chunk 32), evaluation on 256 clients drawn per round.
"""
import ml_collections

from studies.scale.configs import scale_cpu


def get_config(num_clients: str = '10000') -> ml_collections.ConfigDict:
  c = scale_cpu.get_config(num_clients)
  c.train.update(dict(rounds=30, client_fraction=0.02, client_chunk=32, eval_every=10, checkpoint_every=10))
  c.eval.clients_per_eval = 256
  return c
