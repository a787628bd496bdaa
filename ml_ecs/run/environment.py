"""The environment a result was measured in, recorded beside it."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Any

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'rouge-score', 'ml-collections')


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git_commit() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(['git', '-C', here, 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(['git', '-C', here, 'status', '--porcelain', '--untracked-files=no'],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ('+dirty' if dirty else '') if out.returncode == 0 else ''
  except (OSError, subprocess.SubprocessError):
    return ''


# The commit of the code this process loaded, read once at import: a long job (a comparison grid) records
# environment() hours later, when the repository's HEAD may have moved on from the code it is running.
LOADED_COMMIT = _git_commit()


def environment() -> dict[str, Any]:
  """CPU model, core count, Python, package versions, XLA flags, JAX devices and the commit of the code
  this process runs (`LOADED_COMMIT`)."""
  import jax
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  devices = jax.devices()
  return {
      'time_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'cpu': _cpu_model(), 'cpu_count': os.cpu_count(), 'platform': platform.platform(),
      'python': sys.version.split()[0], 'packages': versions,
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'jax_platforms': os.environ.get('JAX_PLATFORMS', ''),
      'device_count': len(devices), 'devices': sorted({f'{d.platform}:{d.device_kind}' for d in devices}),
      'git_commit': LOADED_COMMIT,
  }
