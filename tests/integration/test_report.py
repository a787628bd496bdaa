"""The report command on the workdir of a real tiny run (the main command's, shared with test_federation)."""
import pytest

from ml_ecs.run import plots
from ml_ecs.run.report import load_run, report
from tests.unit.test_report import assert_png


@pytest.mark.slow
@pytest.mark.xdist_group('tiny_main_run')
def test_report_on_a_real_tiny_run(tiny_main_run):
  workdir, returncode, _, stderr = tiny_main_run   # launch/train.py, configs/tiny.py, --config.train.rounds=2
  assert returncode == 0, stderr[-3000:]
  paths = report(str(workdir))
  assert len(paths) == 4
  for p in paths:
    assert_png(p)
  rows, _ = load_run(str(workdir))
  fig = plots.plot_losses(rows)
  assert len(fig.axes[1].get_lines()) >= 2  # the real rows carry client and server LM losses
