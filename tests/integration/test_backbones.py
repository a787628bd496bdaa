"""The main job with Hugging Face backbones (the tiny GPT-2 of tests/fixtures/hf_gpt2): a one-round
run and its PEFT export, and one HF backbone beside one of ours."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip('transformers')
pytest.importorskip('safetensors')

from ml_ecs.backbones import peft_io  # noqa: E402
from ml_ecs.run import export, sizing  # noqa: E402
from ml_ecs.backbones.hf_gpt2 import load_hf_gpt2  # noqa: E402
from ml_ecs.config.validation import validate  # noqa: E402
from tests.unit.test_backbones import BASE, hf_config  # noqa: E402


@pytest.fixture(scope='module')
def hf_run(tmp_path_factory):
  from ml_ecs.run.trainer import train
  cfg = hf_config()
  cfg.train.update(dict(rounds=1, checkpoint_every=1))
  cfg.eval.update(dict(max_test_per_client=4, max_server_test=4))
  workdir = str(tmp_path_factory.mktemp('hf_run') / 'run')
  logs = []
  return cfg, workdir, train(cfg, workdir, progress=False, log=logs.append), logs


@pytest.mark.slow
def test_main_job_with_hf_backbones(hf_run):
  cfg, workdir, result, logs = hf_run
  assert result.status == 'complete' and [r['round'] for r in result.rows] == [0, 1]
  assert np.isfinite(result.rows[-1]['server/lm']) and 0 <= result.rows[-1]['client/rougeLsum_mean'] <= 1
  summary = json.load(open(os.path.join(workdir, 'model_summary.json')))
  assert summary['backbones']['server_model']['source'] == BASE and summary['pretrain'] == {}
  assert summary['backbones']['server_model']['backbone']['width'] == 32
  assert not os.path.exists(os.path.join(workdir, 'backbones'))   # no copy of the checkpoint's weights
  assert not os.path.exists(os.path.join(workdir, 'tokenizer.json'))   # the checkpoint's tokenizer is used
  assert not any(line.startswith('pretrained') for line in logs)
  got = sizing.size_config(cfg)
  assert got['server'] == summary['server'] and got['total_model_bytes'] == summary['total_model_bytes']
  # PEFT export of the server: the adapter names the checkpoint as its base, no base copy
  out = os.path.join(os.path.dirname(workdir), 'server_peft')
  info = export.export_peft_from_workdir(workdir, out, server=True, which='shared')
  assert info['base_model'] == os.path.abspath(BASE) and not os.path.exists(os.path.join(out, export.BASE_DIR))
  adapter_cfg = json.load(open(os.path.join(out, peft_io.ADAPTER_CONFIG)))
  assert adapter_cfg['base_model_name_or_path'] == os.path.abspath(BASE) and adapter_cfg['r'] == 4


@pytest.mark.slow
def test_one_hf_backbone_shares_its_tokenizer(tmp_path):
  """Edge ours (pretrained on the checkpoint's tokenizer), server the checkpoint's weights."""
  from ml_ecs.core import federation
  cfg = validate(hf_config(edge=''))
  cfg.pretrain.steps = 2
  setup, state = federation.init(cfg, workdir=str(tmp_path), log=lambda s: None)
  ref = load_hf_gpt2(BASE, load_tokenizer=False).frozen
  np.testing.assert_array_equal(np.asarray(setup.server_frozen['backbone']['wte'][...]), ref['wte'])
  assert setup.edge_frozen['backbone']['wte'][...].shape == (320, 32)   # tiny edge width, HF vocabulary
  assert setup.text.tokenizer.eos_id == 0 and setup.pretrain_info.keys() == {'edge_model'}
  cached = os.listdir(tmp_path / 'backbones')
  assert len(cached) == 1 and cached[0].startswith('edge_model-')
