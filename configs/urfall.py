"""ML-ECS on UR Fall Detection features read from local files (see ml_ecs/data/urfall.py).

  python launch/train.py --config=configs/urfall.py --config.data.path=/data/urfall --workdir=/tmp/urfall
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data.name = 'urfall'
  c.data.path = ''             # directory with y.csv, acce.csv, depth.csv, rgb.csv
  c.data.public_per_client = 64
  c.data.encoders = ml_collections.ConfigDict(dict(
      acce=('conv1d', 'transformer'), depth=('mlp', 'conv1d'), rgb=('mlp',)))
  c.text.update(dict(vocab_size=512, answer_len=16))
  for m in (c.edge_model, c.server_model):
    m.backbone.max_len = 40
  return c
