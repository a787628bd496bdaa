"""Tiny config for tests and smoke runs: a few clients, small models, two rounds."""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data.num_clients = 3
  c.data.public_per_client = 32
  c.data.modality_sets = (('accel', 'depth', 'image'), ('accel', 'depth', 'image'), ('depth',))
  c.data.encoders.accel = ('conv1d',)
  c.data.encoders.image = ('mlp',)
  c.edge_model = default.model(default.backbone(width=32, layers=1, heads=2), encoder_width=16)
  c.server_model = default.model(default.backbone(width=48, layers=2, heads=2), encoder_width=16)
  c.pretrain.steps = 20
  c.train.update(dict(rounds=2, public_steps=2, private_steps=2, server_steps=2, batch_size=8, eval_every=1))
  c.eval.update(dict(max_test_per_client=8, max_server_test=16))
  return c
