"""SE-CCL, SLM-enhanced CCL: bidirectional alignment of fused representations on public data.

The server sends its representations of the public split down; each client aligns its
own to them (InfoNCE, positives = same public sample id); the clients send theirs up and
the server aligns to their weighted mean per sample (`se_ccl_targets`).

Faithful options (configs/default.py):
- `method.se_ccl_head`: 'mlp' puts a projection head (a small private MLP on z,
  `MultimodalLM.se_head`, used only for this loss; the server has its own) between z
  and the alignment, so the soft-prompt bottleneck z is not aligned directly. What is
  communicated is the head's output: the server aligns in its own projection space to
  the clients' projected representations. 'none': align z itself (the original).
- `method.se_ccl_warmup`: no alignment, on either side, in rounds before this one
  (0-based round index; targets get weight 0, so the term and its gradient are 0).
- `method.se_ccl_reliability`: 'lm' weights targets by reliability, so that no side aligns
  to representations worse than its own. Reliability of a node = its teacher-forced LM
  loss on its own labelled training data at the start of the round (lower is more
  reliable): a client on its labelled private split, the server on its labelled public
  split (`NodeProgram.split_lm`; inf without labels). A client aligns to the server's
  targets iff server loss <= client loss; the server uses a client's upload iff client
  loss <= server loss. The two losses are on different data of the same task (caveat:
  training-data losses favour overfit nodes). 'none': every target counts (the original).
Metrics: client/public_se_ccl, client/se_ccl_used (fraction of sampled clients that aligned),
client/reliability_lm, server/se_ccl, server/se_ccl_targets (public samples with a
target), server/se_ccl_clients (uploads used), server/reliability_lm.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ml_ecs.losses.ccl import l2_normalize, masked_soft_ce

HEADS = ('mlp', 'none')
RELIABILITY = ('lm', 'none')


def warm(round_index: int, warmup: int) -> bool:
  """Whether alignment is on in round `round_index` (0-based): not before `warmup`."""
  return round_index >= warmup


def client_target_weight(client_loss: ArrayLike, server_loss: ArrayLike, on: ArrayLike,
                         reliability: bool) -> jax.Array:
  """Weight of the server's targets for one client: `on` x 1[server loss <= client loss]."""
  on = jnp.asarray(on, jnp.float32)
  if not reliability:
    return on
  return on * (jnp.asarray(server_loss) <= jnp.asarray(client_loss)).astype(jnp.float32)


def upload_weights(weights: ArrayLike, client_loss: ArrayLike | None, server_loss: ArrayLike, on: float,
                   reliability: bool) -> jax.Array:
  """Weights [C] of the clients' uploads in the server's targets: MMA weight x `on`
  x (with reliability) 1[client loss <= server loss]."""
  w = jnp.asarray(weights) * on
  if reliability and client_loss is not None:
    w = w * (jnp.asarray(client_loss) <= jnp.asarray(server_loss)).astype(w.dtype)
  return w


def _direction(logits: jax.Array, valid: jax.Array, pos: jax.Array) -> jax.Array:
  """Mean soft-target CE over rows (axis 1 = candidates) that have a positive; 0 if none."""
  n_pos = jnp.sum(pos, axis=1)
  probs = pos / jnp.maximum(n_pos, 1)[:, None].astype(logits.dtype)
  ce = masked_soft_ce(logits, valid, probs, axis=1)
  has = n_pos > 0
  total = jnp.sum(jnp.where(has, ce, 0))
  return total / jnp.maximum(jnp.sum(has), 1).astype(total.dtype)


def se_ccl_loss(z: ArrayLike, targets: ArrayLike, z_ids: ArrayLike, target_ids: ArrayLike,
                   z_mask: ArrayLike, target_mask: ArrayLike, tau: ArrayLike,
                   symmetric: bool = True) -> jax.Array:
  """InfoNCE aligning z to targets; positives are pairs with the same sample id.

  Soft targets P_ij = 1[z_ids_i == target_ids_j] normalised over valid j; logits are
  cosine / tau. Masked rows/targets are excluded; rows without a positive are dropped.

  Args:
    z: [B, D] representations.
    targets: [M, D] alignment targets.
    z_ids: [B] int sample ids of z.
    target_ids: [M] int sample ids of targets (may repeat).
    z_mask: [B]; nonzero marks valid z rows.
    target_mask: [M]; nonzero marks valid targets.
    tau: temperature.
    symmetric: static; also add the targets -> z direction (the two are averaged).

  Returns:
    Scalar loss; 0 if no valid positive pair exists.
  """
  zm = jnp.asarray(z_mask).astype(bool)
  tm = jnp.asarray(target_mask).astype(bool)
  zn = l2_normalize(z, zm)
  tn = l2_normalize(targets, tm)
  logits = zn @ tn.T / tau                                  # [B, M]
  valid = zm[:, None] & tm[None, :]
  pos = ((jnp.asarray(z_ids)[:, None] == jnp.asarray(target_ids)[None, :]) & valid)
  pos = pos.astype(logits.dtype)
  loss = _direction(logits, valid, pos)
  if symmetric:
    loss = 0.5 * (loss + _direction(logits.T, valid.T, pos.T))
  return loss


def se_ccl_targets(z: Sequence[jax.Array], ids: Sequence[jax.Array], valid: Sequence[jax.Array],
                   weights: Sequence[jax.Array], num_public: int) -> tuple[jax.Array, jax.Array]:
  """The server's alignment targets: weighted mean of uploaded client representations per public sample.

  z[k]: [C_k, N, d]; ids[k]: [C_k, N] public positions; valid[k]: [C_k, N]; weights[k]: [C_k]
  (one entry per cohort). Non-finite uploads get no weight.
  Returns (targets [num_public, d], has_target [num_public]).
  """
  zs = jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in z])
  flat_ids = jnp.concatenate([i.reshape(-1) for i in ids])
  wv = jnp.concatenate([(v * w[:, None]).reshape(-1) for v, w in zip(valid, weights)])
  wv = jnp.where(jnp.isfinite(zs).all(-1), wv, 0.0)
  zs = jnp.where(wv[:, None] > 0, zs, 0.0)
  num = jax.ops.segment_sum(zs * wv[:, None], flat_ids, num_segments=num_public)
  den = jax.ops.segment_sum(wv, flat_ids, num_segments=num_public)
  return num / jnp.maximum(den, 1e-12)[:, None], den > 0


# ---------------------------------------------------------------------------- round plumbing
def round_context(setup, state) -> tuple[dict | None, jax.Array | None]:
  """(the SE-CCL entries of the clients' ctx this round, the server's reliability loss).

  None, None when no representations are exchanged; the server's loss is computed only
  when reliability weighting is on and the warm-up is over (else 0, unused).
  """
  if not setup.sends_representations:
    return None, None
  on = warm(int(state.round), setup.cfg.method.se_ccl_warmup)
  if setup.stages.public.reliability and on:
    server_loss = setup.server_reliability_fn(state.server.trainables, setup.server_frozen, setup.public_train)
  else:
    server_loss = jnp.zeros((), jnp.float32)
  return {'se_on': jnp.float32(on), 'server_loss': jnp.asarray(server_loss, jnp.float32)}, server_loss


def server_upload_weights(setup, state, outs, weights, server_loss) -> tuple[jax.Array, ...]:
  """Per cohort, the weights of the clients' uploads in the server's targets (`upload_weights`)."""
  if not setup.sends_representations:
    return tuple(weights)
  on = float(warm(int(state.round), setup.cfg.method.se_ccl_warmup))
  rel = setup.stages.public.reliability
  return tuple(upload_weights(w, o.metrics['reliability_lm'] if rel else None, server_loss, on, rel)
               for w, o in zip(weights, outs))


def server_metrics(up_weights, has_target, server_loss) -> dict[str, float]:
  """How many targets the server's alignment used this round."""
  return {'server/se_ccl_targets': int(jnp.sum(has_target)),
          'server/se_ccl_clients': int(sum(int(jnp.sum(w > 0)) for w in up_weights)),
          'server/reliability_lm': float(server_loss)}
