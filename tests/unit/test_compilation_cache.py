"""Where the main job keeps compiled programs (ml_ecs/run/compilation_cache.py)."""
import os

from ml_ecs.run.compilation_cache import default_cache_dir


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert default_cache_dir() == os.path.join(str(tmp_path / 'xdg'), 'ml_ecs', 'jax')
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert default_cache_dir() == os.path.join(str(tmp_path / 'home'), '.cache', 'ml_ecs', 'jax')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax'))
  assert default_cache_dir() == str(tmp_path / 'jax')
