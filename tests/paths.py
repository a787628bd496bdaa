"""Paths shared by both tiers (tests/unit, tests/integration): the repository root and tests/fixtures."""
import os

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
FIXTURES = os.path.join(TESTS, 'fixtures')
# JAX's persistent compilation cache of the suite (tests/conftest.py), shared with the runs it spawns.
JAX_CACHE = os.path.join(ROOT, '.pytest_cache', 'jax_cache')


def cached_env(**extra) -> dict:
  """The environment of a run a test spawns: JAX's persistent compilation cache of the suite (compiled
  programs are reused; results are unchanged), CPU only."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=JAX_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', JAX_PLATFORMS='cpu', **extra)
