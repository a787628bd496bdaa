"""A federation trains on a random-weight architecture (backbone.hf = 'random:NAME'): the build path that the
GPT-2 pair takes without checkpoints, on a tiny architecture added to the known table for the test."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ml_ecs.backbones import resolve as backbones
from ml_ecs.core import federation


@pytest.mark.slow
def test_a_federation_trains_on_a_random_architecture(tiny_config, dataset, tmp_path, monkeypatch):
  monkeypatch.setitem(backbones.KNOWN_GPT2, 'tiny-test', {**backbones.KNOWN_GPT2['gpt2'], 'n_embd': 32,
                                                          'n_layer': 1, 'n_head': 2, 'n_positions': 64,
                                                          'vocab_size': 500})
  cfg = copy.deepcopy(tiny_config)
  cfg.edge_model.backbone.hf = 'random:tiny-test'
  setup, state = federation.init(cfg, workdir=str(tmp_path), dataset=dataset, log=lambda s: None)
  leaves = jax.tree.leaves(setup.edge_frozen)
  assert any(x.shape[0] == 500 for x in leaves if x.ndim == 2)          # the table's embedding rows
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
  assert all(float(jnp.std(x)) > 0 for x in leaves if x.ndim == 2)      # random weight matrices, not zeros
  cached = list((tmp_path / 'backbones').iterdir()) if (tmp_path / 'backbones').exists() else []
  assert not [p for p in cached if p.name.startswith('edge_model')]     # nothing pretrained for the edge
  state, metrics = federation.run_round(setup, state)
  assert np.isfinite(metrics['client/private_lm']) and np.isfinite(metrics['server/lm'])
