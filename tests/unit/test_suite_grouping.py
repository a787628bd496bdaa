"""The suite's own machinery: tests that share a run (pytest.mark.xdist_group) stay on one xdist worker,
so the shared run is made once (pytest.ini's --dist loadgroup; setup.py's pytest pin explains why)."""
import os

import pytest

pytestmark = pytest.mark.xdist_group('suite_grouping')


def test_grouped_tests_carry_their_group_under_xdist(request):
  if not os.environ.get('PYTEST_XDIST_WORKER'):
    pytest.skip('only meaningful under pytest -n N')
  # xdist's loadgroup scheduler sends tests with the same '@group' suffix to one worker; without the
  # suffix, every worker that gets one of a group's tests makes the group's shared run again.
  assert request.node.nodeid.endswith('@suite_grouping'), request.node.nodeid
