"""Default central-DP config: DP-FedAvg of the shared LoRA on the default experiment (30 rounds).

  python launch/train.py --config=studies/dp/configs/dp.py --workdir=/tmp/ml_ecs_dp
Each client's shared-LoRA update is clipped to L2 norm 1.0 and Gaussian noise with noise
multiplier 1.0 is added to the aggregate; client_fraction 0.5 samples 2 of each cohort of 3
clients (the default's cohorts have 3, 3 and 2), so the accountant uses q = 2/3 and the RDP
accountant gives epsilon of about 27.1 at delta 1e-5 after 30 rounds (summary.json: dp.epsilon,
dp.sampling_rate; metrics: dp/epsilon per round). SE-CCL representations are not noised here (dp.noise_representations):
see docs/faults_and_privacy.md for what this covers.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.train.client_fraction = 0.5
  c.dp.update(dict(enabled=True, clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, accountant='rdp'))
  return c
