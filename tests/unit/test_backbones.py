"""Hugging Face backbones in the federation (`backbone.hf`, ml_ecs.backbones.resolve) and sizing of
configs at realistic sizes (ml_ecs.run.sizing), with the tiny GPT-2 of tests/fixtures/hf_gpt2
(the runs with them are in tests/integration/test_backbones.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from flax import nnx

pytest.importorskip('transformers')
pytest.importorskip('safetensors')

from ml_ecs.backbones import resolve as backbones
from ml_ecs.run import sizing  # noqa: E402
from ml_ecs.models.decoder import DecoderLM  # noqa: E402
from ml_ecs.backbones.hf_gpt2 import export_hf_gpt2, load_hf_gpt2  # noqa: E402
from ml_ecs.data.tokenizer import TextTokenizer  # noqa: E402
from ml_ecs.config.validation import ConfigError, validate  # noqa: E402
from tests.paths import FIXTURES

BASE = os.path.join(FIXTURES, 'hf_gpt2', 'base')


def hf_config(edge: str = BASE, server: str = BASE):
  """configs/tiny.py with HF backbones; the fixture's tokenizer needs 13 instruction and 27 answer
  tokens, so prompt 4 + 14 + 28 = 46 fits its n_positions of 64."""
  from configs import tiny
  c = tiny.get_config()
  c.edge_model.backbone.hf, c.server_model.backbone.hf = edge, server
  for m in (c.edge_model, c.server_model):
    m.backbone.max_len = 48   # used by our own backbone only
  c.text.update(dict(instr_len=14, answer_len=28))
  return c


def test_checkpoint_decides_architecture_and_tokenizer():
  cfg = validate(hf_config(server=''))
  logged = []
  bb = backbones.resolve(cfg, log=logged.append)
  edge = bb.models['edge_model'].backbone
  assert (edge.width, edge.layers, edge.heads, edge.max_len, edge.hf) == (32, 2, 2, 64, BASE)
  assert (edge.lora_rank, edge.lora_alpha) == (cfg.edge_model.backbone.lora_rank, cfg.edge_model.backbone.lora_alpha)
  assert logged == [f'edge_model.backbone from {BASE}: layers 1 -> 2, max_len 48 -> 64 (the checkpoint decides)']
  # our server backbone keeps its config and is built on the checkpoint's tokenizer
  assert bb.models['server_model'].backbone.width == 48 and bb.sources['server_model'] == 'pretrained'
  assert bb.tokenizer.eos_id == 0 and bb.vocab_sizes == {'edge_model': 320, 'server_model': 320}
  assert bb.tokenizer_id == BASE
  assert set(bb.weights) == {BASE}


def test_backbone_errors(tmp_path):
  # a checkpoint with another vocabulary (our own BPE): edge and server cannot share a tokenizer
  tok = TextTokenizer.train(['walking sitting lying'], 300)
  bcfg = load_hf_gpt2(BASE, load_tokenizer=False).config
  other = export_hf_gpt2(nnx.to_pure_dict(nnx.state(DecoderLM(bcfg, tok.vocab_size, rngs=nnx.Rngs(0)))),
                         bcfg, tmp_path / 'other', tokenizer=tok)
  with pytest.raises(ConfigError, match=r"edge_model.backbone.hf = .*base' and server_model.backbone.hf = "
                                        r".*other' have different tokenizers"):
    backbones.resolve(validate(hf_config(server=str(other))), log=lambda s: None)
  too_long = hf_config()
  too_long.text.answer_len = 60
  with pytest.raises(ConfigError, match=r'n_positions = 64, fewer than edge_model.prompt_len \+ text.instr_len '
                                        r'\+ text.answer_len = 78'):
    backbones.resolve(validate(too_long), log=lambda s: None)
  with pytest.raises(ConfigError, match='server_model.backbone.hf = .*not found'):
    backbones.resolve(validate(hf_config(server=str(tmp_path / 'missing'))), log=lambda s: None)
  bad = hf_config()
  bad.edge_model.backbone = bad.edge_model.backbone.to_dict() | {'hf': 3}   # type-safe ConfigDict refuses it
  with pytest.raises(ConfigError, match='edge_model.backbone.hf = 3'):
    validate(bad)


def test_sizing_gpt2_pair_without_weights():
  """configs/gpt2_pair.py sized from the public GPT-2 configs (no hub here): known parameter counts."""
  from configs import gpt2_pair
  s = sizing.size_config(gpt2_pair.get_config())
  assert s['backbones']['edge_model']['backbone']['layers'] == 6
  # distilgpt2 and gpt2-medium: 81.9M and 354.8M base parameters (tied head), as transformers counts them
  assert {e['params']['frozen']['params'] for e in s['edge_cohorts']} == {81_912_576}
  assert s['server']['frozen']['params'] == 354_823_168
  # LoRA r=8 on c_attn (768 -> 2304) and c_proj (768 -> 768) of 6 layers, + 3 shared modality
  # projections d_enc x d_enc + bias (method.modality_params='projection', d_enc = 64)
  lora = 6 * 8 * (768 + 2304 + 768 + 768)
  modality = 3 * (64 * 64 + 64)
  assert {e['params']['shared']['params'] for e in s['edge_cohorts']} == {lora + modality}
  assert s['per_client']['shared_lora_bytes'] == 4 * (lora + modality)
  assert 0 < s['edge_lora_fraction'] < 0.01 and 0 < s['round']['comm/ratio'] < 0.01


def test_sizing_reads_a_local_checkpoint_config():
  s = sizing.size_config(validate(hf_config()))
  assert s['backbones']['server_model']['backbone']['width'] == 32
  ref = load_hf_gpt2(BASE, load_tokenizer=False)
  n = sum(int(np.prod(np.shape(x))) for x in __import__('jax').tree.leaves(ref.frozen))
  assert s['server']['frozen']['params'] == n
