"""Shared by both tiers (tests/unit: fast, tiny shapes; tests/integration: end-to-end runs): tiny configs
and the dataset, the repository root on sys.path, JAX's persistent compilation cache, xdist grouping."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # configs/ is a plain folder of config files


def pytest_configure(config):
  from tests.paths import suite_xla_flags
  # Before JAX starts its backend in this process (and so in every process the suite spawns; xdist's
  # workers inherit the controller's, so they do not probe again).
  os.environ['XLA_FLAGS'] = suite_xla_flags(os.environ.get('XLA_FLAGS', ''))
  # Main jobs the suite spawns keep pretrained backbones in the suite's folder, not the user's ~/.cache.
  os.environ['ML_ECS_BACKBONE_CACHE'] = os.path.join(config.rootpath, '.pytest_cache')
  config.addinivalue_line('markers', 'slow: end-to-end tests (still run in CI)')
  config.addinivalue_line('markers', 'exhaustive: long versions of a slow test (e.g. 20 kills instead of 4); '
                          'skipped unless selected with -m exhaustive')
  # Shared runs stay on one xdist worker: pytest.ini's --dist loadgroup and pytest.mark.xdist_group(name).
  # Many tests build federations whose jitted functions are identical (same tiny shapes):
  # a persistent compilation cache shared by the xdist workers compiles each once.
  import jax
  from ml_ecs.run.compilation_cache import enable_compilation_cache
  enable_compilation_cache(os.path.join(config.rootpath, '.pytest_cache', 'jax_cache'))


def pytest_collection_modifyitems(config, items):
  if 'exhaustive' in (config.option.markexpr or ''):
    return
  skip = pytest.mark.skip(reason='exhaustive: run it with python -m pytest -m exhaustive tests')
  for item in items:
    if 'exhaustive' in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope='session')
def dataset():
  from ml_ecs.data.embedded import load_default
  return load_default()


@pytest.fixture(scope='session')
def tiny_config():
  from configs import tiny
  return tiny.get_config()
