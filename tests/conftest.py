"""Shared by both tiers (tests/unit: fast, tiny shapes; tests/integration: end-to-end runs): tiny configs
and the dataset, the repository root on sys.path, JAX's persistent compilation cache, xdist grouping."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # configs/ is a plain folder of config files


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end tests (still run in CI)')
  # Tests that share a module- or session-scoped run carry pytest.mark.xdist_group(name); with
  # `-n N` (whose default distribution is 'load') they go to one worker, so the run is made once.
  if getattr(config.option, 'dist', 'no') == 'load':
    config.option.dist = 'loadgroup'
  # Many tests build federations whose jitted functions are identical (same tiny shapes):
  # a persistent compilation cache shared by the xdist workers compiles each once.
  import jax
  from ml_ecs.run.compilation_cache import enable_compilation_cache
  enable_compilation_cache(os.path.join(config.rootpath, '.pytest_cache', 'jax_cache'))


@pytest.fixture(scope='session')
def dataset():
  from ml_ecs.data.embedded import load_default
  return load_default()


@pytest.fixture(scope='session')
def tiny_config():
  from configs import tiny
  return tiny.get_config()
