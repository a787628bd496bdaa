"""ML-ECS: text-anchored GRAM CCL, AMT with convex gates, MMA over shared modality projections (backbone by
samples, modality leaves by present observations), SE-CCL through projection heads with warm-up and
reliability weighting; and its four ablations, one component removed each.

Its client side is the interface's default local update (AMT's stages, `amt.client_update`, switched by the
method fields below); what is its own is SE-CCL's round plumbing: the gate the clients receive
(`round_context`) and the server's alignment targets, the reliability-weighted mean of the clients'
public representations (`server_targets`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ml_ecs.aggregation import dp
from ml_ecs.algorithms.base import Algorithm
from ml_ecs.algorithms.ml_ecs import se_ccl
from ml_ecs.core import faults
from ml_ecs.core.context import AlignmentGate


class MLECS(Algorithm):
  name = 'ml_ecs'
  fields = dict(ccl='gram', ccl_anchor='text', amt=True, gates='convex', mma_backbone='samples',
                mma_modality='observations', se_ccl=True, se_ccl_head='mlp', se_ccl_reliability='lm',
                fedprox_mu=0.0, zero_fill=False, modality_dropout=0.0, communicate=True)

  def round_context(self, setup, state) -> tuple[AlignmentGate | None, jax.Array | None]:
    """The SE-CCL gate: on after the warm-up; the server's reliability (its LM loss on the public hold-out,
    the samples every client measures its own on; without a hold-out, on its labelled public training
    split) computed only when reliability weighting is on and the warm-up is over (else 0, unused)."""
    if not setup.sends_representations:
      return None, None
    on = se_ccl.warm(int(state.round), setup.cfg.method.se_ccl_warmup)
    if setup.stages.public.reliability and on:
      server_loss = setup.server_reliability_fn(state.server.trainables, setup.server_frozen,
                                                se_ccl.reliability_split(setup.public_holdout, setup.public_train))
    else:
      server_loss = jnp.zeros((), jnp.float32)
    return AlignmentGate(jnp.float32(on), jnp.asarray(server_loss, jnp.float32)), server_loss

  def server_targets(self, setup, state, uploads, accepted, server_loss, key):
    """The weighted mean per public sample of the accepted clients' representations, each client weighted
    by its accepted MMA weight x the warm-up x (with reliability) 1[client loss <= server loss]; with
    dp.noise_representations clipped and noised (`ml_ecs.aggregation.robust`)."""
    if not setup.sends_representations:
      return super().server_targets(setup, state, uploads, accepted, server_loss, key)
    on = float(se_ccl.warm(int(state.round), setup.cfg.method.se_ccl_warmup))
    rel = setup.stages.public.reliability
    weights = tuple(se_ccl.upload_weights(w, o.metrics['reliability_lm'] if rel else None, server_loss, on, rel)
                    for w, o in zip(accepted, uploads.outs))
    outs, dp = uploads.outs, setup.cfg.dp
    zs, ids, valid = tuple(o.z for o in outs), tuple(o.public_ids for o in outs), tuple(o.z_valid for o in outs)
    if dp.enabled and dp.noise_representations:
      zs = tuple(dp.clip_representations(z, v, dp.repr_clip_norm) for z, v in zip(zs, valid))
    targets, has_target = setup.targets_fn(zs, ids, valid, weights, setup.num_public)
    if dp.enabled and dp.noise_representations:
      targets = dp.noise_representation_targets(
          valid, weights, ids, setup.num_public, jax.random.fold_in(key, faults.NOISE_STREAM + 1),
          dp.repr_clip_norm, dp.repr_noise_multiplier, targets)
    metrics = {'server/se_ccl_targets': int(jnp.sum(has_target)),
               'server/se_ccl_clients': int(sum(int(jnp.sum(w > 0)) for w in weights)),
               'server/reliability_lm': float(server_loss)}
    return targets, has_target, metrics


def ablation(name: str, **changes) -> type[MLECS]:
  """ML-ECS with some method fields changed (one component removed); `changes` says which."""
  return type(f'MLECS_{name}', (MLECS,), {'name': name, 'fields': {**MLECS.fields, **changes},
                                          'changes': dict(changes)})


ABLATIONS = (ablation('ml_ecs_no_ccl', ccl='none'), ablation('ml_ecs_no_amt', amt=False),
             ablation('ml_ecs_no_mma', mma_backbone='samples', mma_modality='samples'),
             ablation('ml_ecs_no_se_ccl', se_ccl=False))
