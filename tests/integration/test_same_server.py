"""The server is the same model, initialised the same and trained at the same rate, under every method
(issue 21: AMT's convex gates used to reach the ML-ECS server only, and each method's tuned client
learning rate was the server's too)."""
import jax
import numpy as np
import pytest
from flax import nnx

from ml_ecs.algorithms.ml_ecs import amt
from ml_ecs.algorithms.registry import apply_strategy
from ml_ecs.config.validation import validate
from ml_ecs.models import params
from ml_ecs.models.multimodal import MultimodalLM, node_options

METHODS = ('local', 'fedavg', 'ml_ecs')


def _server(cfg, dataset):
  """The server's trainable parts as the main job builds it (same options, same init key)."""
  mods = dataset.modality_names
  shapes = {m: x.shape[1:] for m, x in dataset.modalities.items()}
  model = MultimodalLM(shapes, {k: cfg.data.encoders[k][0] for k in mods}, mods, cfg.server_model,
                       cfg.text.vocab_size, rngs=nnx.Rngs(jax.random.key(cfg.seed + 29)),
                       **node_options(cfg, 'server_model'))
  return model, jax.tree.map(np.asarray, params.split_model(model)[1])


@pytest.fixture(scope='module')
def servers(tiny_config, dataset):
  out = {}
  for i, name in enumerate(METHODS):
    cfg = apply_strategy(tiny_config, name)
    cfg.train.learning_rate = 1e-3 * (i + 1)   # each method's own (tuned) client rate
    validate(cfg)
    out[name] = (cfg, *_server(cfg, dataset))
  return out


def test_server_parameter_trees_are_equal(servers):
  ref_cfg, _, ref = servers['local']
  for name in METHODS[1:]:
    _, _, tree = servers[name]
    assert jax.tree.structure(tree) == jax.tree.structure(ref), name
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(tree)):
      assert a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)     # same initialisation too
  # the client models do differ (AMT's convex gates, CCL's text projection): a client-side choice
  assert node_options(servers['ml_ecs'][0], 'edge_model')['gates'] == 'convex'
  assert node_options(servers['local'][0], 'edge_model')['gates'] == 'scaled'


def test_server_gates_are_plain_under_every_method(servers):
  for name in METHODS:
    model = servers[name][1]
    for block in model.backbone.blocks:
      np.testing.assert_allclose(np.asarray(block.mix_gates()), [1.0, 1.0])


def test_server_learning_rate_is_one_value_for_every_method(servers):
  rates = {name: amt.stages(cfg.method, cfg.train).server.learning_rate for name, (cfg, *_) in servers.items()}
  assert set(rates.values()) == {servers['local'][0].train.server_learning_rate}
  assert len({cfg.train.learning_rate for cfg, *_ in servers.values()}) == len(METHODS)   # clients differ
