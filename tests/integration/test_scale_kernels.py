"""benchmarks/scale_main.py's `kernel_times`: the round's compiled functions timed alone, each called, and the
federation's state left as it was (their inputs are donated, so the timing runs on copies)."""
import copy
import dataclasses

import numpy as np
import pytest

from benchmarks import scale_main
from ml_ecs.core import federation
from tests.unit.test_scale import _host_cfg


def _metrics(m: dict) -> dict:
  return {k: v for k, v in m.items() if not k.startswith('time/')}


@pytest.mark.parametrize('host', [False, True], ids=['device_state', 'host_state'])
def test_kernel_times_call_every_compiled_function_and_leave_the_state(tiny_config, dataset, tmp_path, host):
  cfg = _host_cfg(tiny_config) if host else copy.deepcopy(tiny_config)
  quiet = lambda s: None  # noqa: E731
  setup, state = federation.init(cfg, workdir=str(tmp_path / 'timed'), dataset=dataset, log=quiet)
  calls = []

  def spy(name, fn):
    def call(*args):
      calls.append(name)
      return fn(*args)
    return call
  spied = dataclasses.replace(
      setup, server_round_fn=spy('server', setup.server_round_fn),
      cohorts=tuple(dataclasses.replace(c, round_fn=spy(k, c.round_fn)) for k, c in enumerate(setup.cohorts)))
  out = scale_main.kernel_times(spied, state, repeats=2)
  assert calls == [*range(len(setup.cohorts)), 'server'] * 2
  assert len(out['cohort_kernel_s']) == len(setup.cohorts)
  assert all(t > 0 for t in out['cohort_kernel_s']) and out['server_kernel_s'] > 0
  assert out['cohort_kernels_s'] > 0
  # The round after the timing is the round of an untouched federation built the same way.
  _, timed = federation.run_round(setup, state)
  setup2, state2 = federation.init(cfg, workdir=str(tmp_path / 'untouched'), dataset=dataset, log=quiet)
  _, untouched = federation.run_round(setup2, state2)
  a, b = _metrics(timed), _metrics(untouched)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_equal(a[k], b[k], err_msg=k)
