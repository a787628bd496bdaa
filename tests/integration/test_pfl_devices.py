"""benchmarks/lib/pfl_cifar10.run with the cohort's clients split over two host devices (pfl_cpu.py --cpu_devices)
computes the same rounds as one device: with JAX's default threefry keys (partition-independent draws) the
accuracy and loss histories agree to float rounding."""
import json
import subprocess
import sys

import numpy as np

from tests import paths

SCRIPT = '''
import json, jax
from benchmarks.lib import pfl_cifar10 as pc
assert jax.device_count() == 2, jax.devices()
cfg = dict(num_users=20, per_user=10, cohort=4, batch=5, eval_every=1, num_test=51, image=(8, 8, 3))   # odd: padded
runs = [pc.run(2, cfg, log=lambda m: None, conv_impl='matmul', chunk=1, prng='threefry2x32', devices=d) for d in (1, 2)]
print(json.dumps([dict(devices=r['devices'], round_devices=r['round_devices'], engine=r['engine'], history=r['history']) for r in runs]))
'''


def test_two_host_devices_compute_the_one_device_rounds():
  out = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True, cwd=paths.ROOT, timeout=600,
                       env=paths.cached_env(XLA_FLAGS=paths.xla_flags(2)))
  assert out.returncode == 0, out.stderr[-3000:]
  one, two = json.loads(out.stdout.strip().splitlines()[-1])
  assert (one['devices'], two['devices']) == (1, 2) and 'over 2 devices' in two['engine']
  assert (one['round_devices'], two['round_devices']) == (1, 2)   # the round's model lives on both devices
  assert len(one['history']) == len(two['history']) == 2
  for a, b in zip(one['history'], two['history']):
    assert a['round'] == b['round']
    np.testing.assert_allclose([a['loss'], a['train_loss'], a['accuracy']], [b['loss'], b['train_loss'], b['accuracy']],
                               rtol=1e-4, atol=1e-5)
