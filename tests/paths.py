"""Paths shared by both tiers (tests/unit, tests/integration): the repository root and tests/fixtures."""
import os

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
FIXTURES = os.path.join(TESTS, 'fixtures')
# JAX's persistent compilation cache of the suite (tests/conftest.py), shared with the runs it spawns.
JAX_CACHE = os.path.join(ROOT, '.pytest_cache', 'jax_cache')
# Every process of the suite compiles with light XLA optimisation (tests/conftest.py puts these in
# XLA_FLAGS; the runs a test spawns inherit them): the suite's tiny programs compile in about half the
# time and run a little slower. Compiling is most of the suite's time; what a test compares is
# computed under the same flags on both sides.
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a spawned run with `devices` forced CPU devices: the suite's flags plus the count."""
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform')]
  return ' '.join(kept + [f'--xla_force_host_platform_device_count={devices}'])


def cached_env(**extra) -> dict:
  """The environment of a run a test spawns: JAX's persistent compilation cache of the suite and its
  shared backbone cache (compiled programs and pretrained backbones are reused; results are unchanged;
  the user's ~/.cache is not touched), CPU only."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=JAX_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', JAX_PLATFORMS='cpu',
              ML_ECS_BACKBONE_CACHE=os.path.dirname(JAX_CACHE), **extra)
