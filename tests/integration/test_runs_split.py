"""A program of runs with its run axis split over 2 forced CPU devices (ml_ecs.core.runs.init(run_devices=2))
gives the metrics and evaluations of the same program with every run on both devices, and each device
holds whole runs: the cohorts' and the server's state sharded on the run axis, clients not padded."""
import json
import os
import subprocess
import sys

import pytest

from tests.paths import JAX_CACHE, ROOT, xla_flags
from tests.rows import assert_rows_close

# Two runs of configs/tiny.py (other training and partition seeds and learning rates), as one program, 2 rounds
# and an evaluation, for each run_devices in argv[3:] in turn: one RESULT line each.
PROBE = r'''
import json, sys
import jax
from configs import tiny
from ml_ecs.core import runs
from ml_ecs.run.compilation_cache import enable_compilation_cache
enable_compilation_cache(sys.argv[2])
for run_devices in map(int, sys.argv[3:]):
  cfgs = []
  for seed, data_seed, lr in ((0, 0, 3e-3), (1, 3, 1e-3)):
    c = tiny.get_config()
    c.seed, c.data.seed, c.train.learning_rate = seed, data_seed, lr
    cfgs.append(c)
  program, state = runs.init(cfgs, cache_dir=sys.argv[1], log=lambda s: None, run_devices=run_devices)
  rows = []
  for _ in range(2):
    state, metrics = runs.run_round(program, state)
    rows.append([{k: v for k, v in m.items() if not k.startswith('time/')} for m in metrics])
  evals = [{k: v for k, v in e.items() if not k.startswith('time/')} for e in runs.evaluate(program, state)]
  cohort = jax.tree.leaves(state.cohorts[0].trainables)[0]
  server = jax.tree.leaves(state.server.trainables)[0]
  print('RESULT ' + json.dumps({
      'run_devices': run_devices, 'mesh': dict(program.setups[0].mesh.shape),
      'stacked': [len(c.client_ids) for c in program.setups[0].cohorts],
      'real': [c.num_real for c in program.setups[0].cohorts],
      'cohort_spec': str(cohort.sharding.spec), 'server_spec': str(server.sharding.spec),
      'cohort_shards': sorted([list(s.data.shape) for s in cohort.addressable_shards]),
      'runs_per_shard': sorted(s.data.shape[0] for s in server.addressable_shards),
      'rows': rows, 'evals': evals}, default=float))
'''
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('runs_split')]


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """{run_devices: result} of one process with 2 CPU devices: the run axis split over both, then over one."""
  cache = tmp_path_factory.mktemp('runs_split')
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS='cpu')
  res = subprocess.run([sys.executable, '-c', PROBE, str(cache), JAX_CACHE, '2', '1'], capture_output=True,
                       text=True, env=env, timeout=1200, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-4000:]
  found = [json.loads(l[len('RESULT '):]) for l in res.stdout.splitlines() if l.startswith('RESULT ')]
  return {r['run_devices']: r for r in found}


def test_each_device_holds_whole_runs(results):
  split, whole = results[2], results[1]
  assert split['mesh'] == {'runs': 2, 'clients': 1} and whole['mesh'] == {'clients': 2}
  assert split['cohort_spec'] == "P('runs',)" and split['server_spec'] == "P('runs',)"
  assert split['runs_per_shard'] == [1, 1]                       # one run per device, server included
  assert [s[:2] for s in split['cohort_shards']] == [[1, split['stacked'][0]]] * 2   # all of a run's clients
  assert split['stacked'] == split['real']                       # no padding clients for a 1-wide client axis
  assert whole['stacked'] != whole['real']                       # (the unsplit program pads to 2 devices)


def test_split_program_gives_the_metrics_of_the_unsplit_one(results):
  split, whole = results[2], results[1]
  for r in range(2):
    assert_rows_close([rows[r] for rows in whole['rows']] + [whole['evals'][r]],
                      [rows[r] for rows in split['rows']] + [split['evals'][r]])
  # the two runs differ (seeds and rates reach each device's run)
  assert split['evals'][0] != split['evals'][1]
