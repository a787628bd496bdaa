"""JAX's persistent compilation cache: reuse compiled XLA programs across processes and runs."""
from __future__ import annotations

import os

import jax


def enable_compilation_cache(directory: str) -> None:
  """Caches every compiled program under `directory` (shared safely by concurrent processes)."""
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def default_cache_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR when set, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache)
  /ml_ecs/jax: where the main job keeps compiled programs unless told otherwise."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'ml_ecs', 'jax')
