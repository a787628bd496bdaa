"""Language-modelling loss for the text decoder."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike


def _sanitise(logits: ArrayLike, targets: ArrayLike,
              mask: ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Boolean mask plus logits/targets with masked-out positions zeroed."""
  m = jnp.asarray(mask).astype(bool)
  logits = jnp.where(m[..., None], jnp.asarray(logits), 0)
  targets = jnp.where(m, jnp.asarray(targets), 0)
  return logits, targets, m


def lm_loss(logits: ArrayLike, targets: ArrayLike, mask: ArrayLike) -> jax.Array:
  """Mean token cross-entropy over positions where mask is nonzero.

  Args:
    logits: [B, T, V] next-token logits.
    targets: [B, T] int token ids (any value at masked positions).
    mask: [B, T]; nonzero marks positions that count.

  Returns:
    Scalar sum(CE * mask) / max(count, 1); 0 when nothing is masked in.
  """
  logits, targets, m = _sanitise(logits, targets, mask)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  total = jnp.sum(jnp.where(m, ce, 0))
  return total / jnp.maximum(jnp.sum(m), 1).astype(total.dtype)


def token_accuracy(logits: ArrayLike, targets: ArrayLike, mask: ArrayLike) -> jax.Array:
  """Fraction of masked-in positions whose argmax logit equals the target (0 if none)."""
  logits, targets, m = _sanitise(logits, targets, mask)
  hit = (jnp.argmax(logits, axis=-1) == targets) & m
  return jnp.sum(hit) / jnp.maximum(jnp.sum(m), 1).astype(jnp.float32)
