"""Default central-DP config: DP-FedAvg of the shared LoRA on the default experiment (30 rounds).

  python launch/train.py --config=studies/dp/configs/dp.py --workdir=/tmp/ml_ecs_dp
Each client's shared-LoRA update is clipped to L2 norm 1.0 and Gaussian noise with noise
multiplier 1.0 is added to the aggregate; with client_fraction 0.5 the RDP accountant gives
epsilon of about 20.8 at delta 1e-5 after 30 rounds (summary.json: dp.epsilon; metrics:
dp/epsilon per round). SE-CCL representations are not noised here (dp.noise_representations):
see docs/faults_and_privacy.md for what this covers.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.train.client_fraction = 0.5
  c.dp.update(dict(enabled=True, clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, accountant='rdp'))
  return c
