"""Where the main job keeps compiled programs (ml_ecs/run/compilation_cache.py)."""
import dataclasses
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


def test_default_backbone_cache_follows_the_environment(monkeypatch, tmp_path):
  from ml_ecs.run.compilation_cache import default_backbone_cache, writable_folder
  monkeypatch.delenv('ML_ECS_BACKBONE_CACHE', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert default_backbone_cache() == os.path.join(str(tmp_path / 'xdg'), 'ml_ecs')
  monkeypatch.setenv('ML_ECS_BACKBONE_CACHE', '')
  assert default_backbone_cache() == ''                     # off
  assert writable_folder(str(tmp_path / 'new' / 'folder')) == str(tmp_path / 'new' / 'folder')
  (tmp_path / 'file').write_text('x')
  assert writable_folder(str(tmp_path / 'file' / 'sub')) is None


def test_a_shared_backbone_cache_serves_new_workdirs_and_only_for_the_same_text_and_environment(
    monkeypatch, tmp_path, tiny_config):
  import jax
  import numpy as np
  from flax import nnx
  from ml_ecs.backbones import pretrain
  from ml_ecs.data.embedded import load_default
  from ml_ecs.data.text import build_task_text
  from ml_ecs.models.decoder import DecoderLM
  from ml_ecs.models.variables import Frozen
  cfg = tiny_config.copy_and_resolve_references()
  cfg.pretrain.steps = 4
  text = build_task_text(load_default(), cfg.text)

  class Node(nnx.Module):   # the frozen part of a node model: its backbone
    def __init__(self):
      self.backbone = DecoderLM(cfg.edge_model.backbone, text.tokenizer.vocab_size, rngs=nnx.Rngs(0))

  def template():
    return nnx.state(Node(), Frozen)

  def get(workdir, t=text, shared=str(tmp_path / 'shared')):
    frozen, info = pretrain.cached_backbone('edge_model', cfg, t, template(), str(tmp_path / workdir), '', shared)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(frozen))], info

  first, info = get('a')
  assert info is not None                                   # pretrained, written to the run's and the shared cache
  assert len(os.listdir(tmp_path / 'shared' / 'backbones')) == 1
  again, info = get('b')                                     # a new workdir: from the shared cache, no pretraining
  assert info is None and len(os.listdir(tmp_path / 'b' / 'backbones')) == 1
  assert all(np.array_equal(x, y) for x, y in zip(first, again))
  os.remove(tmp_path / 'shared' / 'backbones' / os.listdir(tmp_path / 'shared' / 'backbones')[0])
  assert get('a', shared=None)[1] is None                    # a resume reads its own copy, whatever is shared
  get('a')
  other = dataclasses.replace(text, references=text.references[:-1] + ('a different answer',))
  assert get('c', t=other)[1] is not None                    # other text: the shared entry is not reused
  before = pretrain.environment_key()
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_enable_fast_math=false')
  assert pretrain.environment_key() != before
  assert get('d')[1] is not None                             # other XLA flags: pretrained again
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=3')
  assert get('e')[1] is None                                 # the forced device count is not part of the key
