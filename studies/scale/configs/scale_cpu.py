"""The main job at scale on a CPU host: 1,000 clients of the synthetic source, ~5% per round.

  python launch/train.py --config=studies/scale/configs/scale_cpu.py --workdir=/tmp/ml_ecs_scale
  python launch/train.py --config=studies/scale/configs/scale_cpu.py:40 ...   # the same job with 40 clients (tests)

The default edge model; 3 device types (3 cohorts); 50 sampled clients per round; evaluation
decodes 64 clients (drawn per round), not all 1,000.
"""
import ml_collections

from configs import default


def get_config(num_clients: str = '1000') -> ml_collections.ConfigDict:
  c = default.get_config()
  n = int(num_clients)
  c.data.name = 'synthetic'
  c.data.num_clients = n
  c.data.synthetic_windows = 8
  c.data.public_per_client = 32
  c.data.max_public_sequences = 60   # the public split of a 16-client run, at every size: the server's
                                     # per-round encoding of it does not grow with the federation
  c.train.update(dict(host_state=True, rounds=5, client_fraction=0.05 if n >= 200 else 0.25, eval_every=5, checkpoint_every=5))
  # One vmap per cohort: the default blocks of 8 ran a 17-client cohort as 8 + 8 + 1 (`lax.map` runs the remainder
  # as its own pass), 1.55x slower than one vmap of 17 on 2 cores (benchmarks/RESULTS.md, "The main job at scale").
  c.train.client_chunk = 0
  c.eval.update(dict(max_test_per_client=16, clients_per_eval=64))
  return c
