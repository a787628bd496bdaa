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
# XLA:CPU's older elemental fusion emitters compile the suite's programs in about a quarter less time than
# the MLIR fusion emitters (benchmarks/compile_time.py on configs/tiny.py, cold, 2 interleaved runs each: 32.4-33.1 s
# of XLA compilation against 22.9-26.4 s; the run 40.7-41.9 s against 31.9-36.6 s). Added only where this jaxlib's
# XLA knows the flag: an XLA flag it does not know aborts the process.
LEGACY_FUSION = '--xla_cpu_use_fusion_emitters=false'
# Tried and not adopted (2026-12-04): --xla_cpu_parallel_codegen_split_count=1 cut a cold configs/tiny.py run by
# 8% alone (benchmarks/compile_time.py, 2 interleaved runs each: XLA compilation 15.2 s against 16.7-17.3 s) but
# not the whole suite (980.7 s against 944.8 s of pytest time, the runs back to back; results differ by float rounding).


def suite_xla_flags(current: str) -> str:
  """XLA_FLAGS of the suite's processes: `current` with FAST_COMPILE and, where supported, LEGACY_FUSION
  (flags already in `current` are not repeated)."""
  import subprocess
  import sys
  flags = current.split()
  wanted = FAST_COMPILE.split()
  if LEGACY_FUSION not in flags:
    probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], capture_output=True,
                           env=dict(os.environ, XLA_FLAGS=LEGACY_FUSION, JAX_PLATFORMS='cpu'), timeout=300)
    if probe.returncode == 0:
      wanted.append(LEGACY_FUSION)
  return ' '.join([f for f in wanted if f not in flags] + flags)


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
