"""backbone.hf = 'random:NAME': a known GPT-2 architecture with random weights, resolved without any checkpoint or
Hugging Face package (ml_ecs/backbones/resolve.py)."""
import pytest

from configs import gpt2_pair, tiny
from ml_ecs.backbones import resolve as backbones
from ml_ecs.config.validation import ConfigError
from ml_ecs.run import sizing


def test_random_architecture_resolves_from_the_table_with_our_tokenizer():
  cfg = tiny.get_config()
  cfg.edge_model.backbone.hf = 'random:distilgpt2'
  logs = []
  bb = backbones.resolve(cfg, log=logs.append)
  edge = bb.models['edge_model'].backbone
  assert (edge.width, edge.layers, edge.heads, edge.max_len) == (768, 6, 12, 1024)
  assert bb.sources == {'edge_model': 'random:distilgpt2', 'server_model': 'pretrained'}
  assert bb.tokenizer is None and bb.tokenizer_id == '' and not bb.weights     # our BPE, nothing read
  assert bb.vocab_size('edge_model', 384) == 50257 and bb.vocab_size('server_model', 384) == 384
  assert any('RANDOM weights' in line for line in logs)
  cfg.edge_model.backbone.hf = 'random:gpt5'
  with pytest.raises(ConfigError, match="random:NAME with NAME one of"):
    backbones.resolve(cfg, log=lambda s: None)


def test_random_gpt2_pair_has_the_checkpoints_sizes():
  cfg = gpt2_pair.get_config()
  cfg.edge_model.backbone.hf, cfg.server_model.backbone.hf = 'random:distilgpt2', 'random:gpt2-medium'
  s = sizing.size_config(cfg)
  assert {e['params']['frozen']['params'] for e in s['edge_cohorts']} == {81_912_576}   # as distilgpt2
  assert s['server']['frozen']['params'] == 354_823_168                                # as gpt2-medium
