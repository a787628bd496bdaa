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
  loss at the start of the round (lower is more reliable; `NodeProgram.split_lm`) on the
  public hold-out (`data.public_holdout_fraction` of the public training sequences, which
  no node trains on): the same labelled samples for the server and every client, each
  seen through its own modalities (`reliability_split`). A client aligns to the server's
  targets iff server loss <= client loss; the server uses a client's upload iff client
  loss <= server loss; like with like, so the rule fires in either direction.
  Without a hold-out (data.public_holdout_fraction = 0, configs saved before it existed)
  the old measure: a client on its labelled private training data, the server on its
  labelled public training split (different data, training losses: the larger server
  always looked better and the rule stopped firing toward the server).
  'none': every target counts (the original).
The round's plumbing (warm-up and reliability gates, the server's targets) is the ML-ECS
algorithm's (ml_ecs.algorithms.ml_ecs.algorithm); the loss is ml_ecs.losses.se_ccl.
Metrics: client/public_se_ccl, client/se_ccl_used (fraction of sampled clients that aligned),
client/reliability_lm, server/se_ccl, server/se_ccl_targets (public samples with a
target), server/se_ccl_clients (uploads used), server/reliability_lm.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


HEADS = ('mlp', 'none')
RELIABILITY = ('lm', 'none')


def reliability_split(holdout, own_training_split):
  """The split a node's SE-CCL reliability is measured on: the public hold-out when there is one
  (the same samples for every node), else the node's own labelled training split (the old measure)."""
  return own_training_split if holdout is None else holdout


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
