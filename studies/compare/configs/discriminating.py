"""Benchmarks where collaboration carries information a node lacks (issue "Does ML-ECS help?").

Run: python launch/train.py --config=studies/compare/configs/discriminating.py:VARIANT --workdir=...
Variants (all on top of configs/default.py, faithful ML-ECS):
  clients_scarce (default)  clients label only `data.label_fraction` = 0.15 of their private
                            windows (the unlabelled rest still feeds CCL), see the public split
                            unlabelled (their public stage is SE-CCL only), and the backbones are
                            pretrained on a generic corpus, not on the answer sentences;
  server_scarce             as clients_scarce, but the server too labels only 0.15 of its public
                            training samples (`data.server_label_fraction`);
  generic_only              full labels everywhere, only the generic pretraining corpus.
Headline metrics: client/rougeLsum_multi_mean, server/rougeLsum_multi and accuracy, beside the
paper's single-reference client/rougeLsum_mean and server/rougeLsum; client/global_* for the
aggregated model.
"""
import ml_collections

from configs import default

VARIANTS = ('clients_scarce', 'server_scarce', 'generic_only')


def get_config(variant: str = 'clients_scarce') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'studies/compare/configs/discriminating.py: variant {variant!r}, expected one of {VARIANTS}')
  c = default.get_config()
  c.pretrain.corpus = 'generic'
  # XLA's convolution, as every cell computed before train.conv_impl existed: the grids built on this
  # config (compare.py, collaborate.py) keep their cells' identities and one implementation throughout.
  c.train.conv_impl = 'xla'
  if variant in ('clients_scarce', 'server_scarce'):
    c.data.label_fraction = 0.15
    c.data.public_labels = False
  if variant == 'server_scarce':
    c.data.server_label_fraction = 0.15
  c.method.name = 'ml_ecs'
  return c
