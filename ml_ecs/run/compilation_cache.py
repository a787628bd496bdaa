"""What the main job keeps across runs in the user's cache folder: JAX's persistent compilation cache
(compiled XLA programs) and the pretrained backbones (ml_ecs.backbones.pretrain.cached_backbone)."""
from __future__ import annotations

import os

import jax


def enable_compilation_cache(directory: str) -> None:
  """Caches every compiled program under `directory` (shared safely by concurrent processes)."""
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def _user_cache(*parts: str) -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'ml_ecs', *parts)


def default_cache_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR when set, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache)
  /ml_ecs/jax: where the main job keeps compiled programs unless told otherwise."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  return _user_cache('jax')


def default_backbone_cache() -> str:
  """$ML_ECS_BACKBONE_CACHE when set, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache)/ml_ecs:
  the main job keeps pretrained backbones in its backbones/ folder unless told otherwise."""
  if os.environ.get('ML_ECS_BACKBONE_CACHE') is not None:
    return os.environ['ML_ECS_BACKBONE_CACHE']
  return _user_cache()


def writable_folder(directory: str) -> str | None:
  """`directory` (created if missing) when this process can write into it, else None."""
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return None
  return directory if os.access(directory, os.W_OK | os.X_OK) else None
