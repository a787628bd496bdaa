"""Losses of ML-ECS: language modelling, cross-modal contrastive (CCL) and SE-CCL alignment."""
from ml_ecs.losses.alignment import alignment_loss
from ml_ecs.losses.ccl import gram_contrastive_loss, gram_volume, pairwise_infonce_loss
from ml_ecs.losses.lm import lm_loss, token_accuracy

__all__ = [
    'alignment_loss',
    'gram_contrastive_loss',
    'gram_volume',
    'lm_loss',
    'pairwise_infonce_loss',
    'token_accuracy',
]
