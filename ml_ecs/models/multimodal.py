"""The node model M = {E, C, B}: modality encoders, connector and LoRA backbone.

Between encoders and connector sits one modality-specific shared module per
modality of the whole federation: these are the parameters (``ModalityLoRA``,
tagged with their modality) that MMA averages only over the clients that have
the modality. Two kinds (`method.modality_params`):

- ``'projection'`` (faithful default): a shared per-modality linear map d_enc -> d_enc
  after the private encoder (``ModalityProjection``) with the same architecture and
  the same initialisation on every node, drawn from a key derived from the modality
  name and the training seed (`modality_key`), never from the client. All holders of
  a modality thus start from one map and their private encoders learn to feed it
  (private representation, shared head, as in LG-FedAvg), so averaging it is
  averaging parameters that live in the same coordinates.
- ``'adapter'``: the original residual low-rank adapter e + s e A B on the private
  encoder's output (its init comes from the client's key; averaged across encoders
  whose output coordinates are unrelated).

Every node carries the module of every modality so that the shared part has one
structure on all clients; those of modalities a node lacks receive no gradient
and zero aggregation weight.

Optional parts (`model_options` turns the `method` config into a client's constructor flags;
the server's, `server_model_options`, are the same under every method):
``text_proj`` (text-anchored CCL: frozen token embeddings of the answer, mean over
tokens, trainable projection into the CCL space) and ``se_head`` (SE-CCL projection
head: a small private MLP on z used only for the alignment loss).
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from ml_ecs.models.connector import Connector
from ml_ecs.models.decoder import DecoderLM
from ml_ecs.models.encoders import make_encoder
from ml_ecs.models.variables import ModalityLoRA


class ModalityAdapter(nnx.Module):
  """e + (alpha / r) e A B with B = 0 at init."""

  def __init__(self, modality: str, dim: int, rank: int, alpha: float, *, rngs: nnx.Rngs):
    self.a = ModalityLoRA(jax.random.normal(rngs.params(), (dim, rank)) / jnp.sqrt(dim), modality=modality)
    self.b = ModalityLoRA(jnp.zeros((rank, dim)), modality=modality)
    self.scale = alpha / rank

  def __call__(self, e):
    return e + self.scale * (e @ self.a[...]) @ self.b[...]


MODALITY_PARAMS = ('projection', 'adapter')


def modality_key(modality: str, seed: int | jax.Array) -> jax.Array:
  """The init key of a modality's shared module: a function of the modality name and the
  training seed only, so every node holding the modality draws the same initialisation."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(modality.encode()) & 0x7FFFFFFF)


class ModalityProjection(nnx.Module):
  """Shared per-modality map e W + b (d -> d); W orthogonal from `modality_key`, b = 0."""

  def __init__(self, modality: str, dim: int, seed: int | jax.Array):
    w = jax.nn.initializers.orthogonal()(modality_key(modality, seed), (dim, dim))
    self.kernel = ModalityLoRA(w, modality=modality)
    self.bias = ModalityLoRA(jnp.zeros((dim,)), modality=modality)

  def __call__(self, e):
    return e @ self.kernel[...] + self.bias[...]


class ProjectionHead(nnx.Module):
  """Linear -> GELU -> Linear: the SE-CCL projection head on z (private)."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(d_in, d_in, rngs=rngs)
    self.l2 = nnx.Linear(d_in, d_out, rngs=rngs)

  def __call__(self, z):
    return self.l2(jax.nn.gelu(self.l1(z)))


def node_backbone_config(backbone_cfg: ml_collections.ConfigDict, gates: str = 'scaled',
                         gate_init: float = 2.0) -> ml_collections.ConfigDict:
  """The DecoderLM config a node builds: its backbone config with the gate form of its method."""
  if gates == 'scaled':
    return backbone_cfg
  return ml_collections.ConfigDict({**backbone_cfg.to_dict(), 'gates': gates, 'gate_init': gate_init})


def model_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """MultimodalLM keyword arguments of a client under an experiment config's `method` (and seed).

  The SE-CCL head outputs edge_model.d_z features on every node (edge and server), so
  the communicated representations keep their size. Without AMT the gates stay in the
  'scaled' form at their init (shared weight 1), the plain LoRA model; the gate form is a
  client-side AMT choice (`server_model_options` never applies it).
  """
  m = cfg.method
  return dict(modality_params=m.modality_params, shared_seed=int(cfg.seed),
              text_anchor=m.ccl != 'none' and m.lambda_ccl > 0 and m.ccl_anchor == 'text',
              se_head_dim=int(cfg.edge_model.d_z) if m.se_ccl_head == 'mlp' else 0,
              gates=m.gates if m.amt else 'scaled', gate_init=float(m.gate_init))


def server_model_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """MultimodalLM keyword arguments of the server: the same architecture under every method.

  The server is a comparison point between methods, so nothing about it depends on the method's
  choices: its gates are the plain 'scaled' form (shared and private LoRA both at weight 1, AMT's
  convex gates are a client-side choice), and it always carries the text projection and the
  SE-CCL head (a method without text-anchored CCL or without SE-CCL leaves them unused: they get no
  gradient and sit after every other module, so they do not shift the other modules'
  initialisation). Only whether SE-CCL aligns through the head (`method.se_ccl_head`) follows the
  method; it is a static flag, not a parameter.
  """
  m = cfg.method
  return dict(modality_params=m.modality_params, shared_seed=int(cfg.seed), text_anchor=True,
              se_head_dim=int(cfg.edge_model.d_z), align_head=m.se_ccl_head == 'mlp', gates='scaled',
              gate_init=float(m.gate_init))


def node_options(cfg: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
  """MultimodalLM keyword arguments of node model `name` ('edge_model' or 'server_model'): what the
  main job, sizing and export build."""
  return server_model_options(cfg) if name == 'server_model' else model_options(cfg)


class MultimodalLM(nnx.Module):
  """Encoders for this node's modalities + shared modality modules + connector + decoder LM."""

  def __init__(self, modality_shapes: Mapping[str, Sequence[int]], encoder_types: Mapping[str, str],
               all_modalities: Sequence[str], cfg: ml_collections.ConfigDict, vocab_size: int,
               *, rngs: nnx.Rngs, modality_params: str = 'adapter', shared_seed: int | jax.Array = 0,
               text_anchor: bool = False, se_head_dim: int = 0, gates: str = 'scaled', gate_init: float = 2.0,
               align_head: bool = True, conv_impl: str = 'xla'):
    """cfg: the model config (encoder, connector and backbone fields, see configs/); the keyword
    options come from the method config (`model_options` for a client, `server_model_options` for
    the server); their defaults are the original model. align_head: SE-CCL aligns the SE-CCL
    head's output (when the model has a head) rather than z. conv_impl: how the encoders' convolutions
    run (ml_ecs.models.conv; parameters and results do not depend on it)."""
    self.modalities = tuple(m for m in all_modalities if m in modality_shapes)
    if not self.modalities:
      raise ValueError('a node needs at least one modality')
    if modality_params not in MODALITY_PARAMS:
      raise ValueError(f'modality_params {modality_params!r}: expected one of {MODALITY_PARAMS}')
    self.encoders = nnx.Dict({
        m: make_encoder(encoder_types[m], modality_shapes[m], cfg.encoder_width, cfg.d_enc, rngs=rngs,
                        conv_impl=conv_impl)
        for m in self.modalities})
    if modality_params == 'adapter':
      self.adapters = nnx.Dict({
          m: ModalityAdapter(m, cfg.d_enc, cfg.adapter_rank, cfg.lora_alpha, rngs=rngs)
          for m in all_modalities})
    else:
      self.adapters = nnx.Dict({m: ModalityProjection(m, cfg.d_enc, shared_seed) for m in all_modalities})
    self.connector = Connector(self.modalities, cfg.d_enc, cfg.d_fuse, cfg.d_z, cfg.prompt_len,
                               cfg.backbone.width, rngs=rngs)
    self.backbone = DecoderLM(node_backbone_config(cfg.backbone, gates, gate_init), vocab_size, rngs=rngs)
    self.prompt_len = cfg.prompt_len
    self.text_proj = nnx.Linear(cfg.backbone.width, cfg.d_fuse, rngs=rngs) if text_anchor else None
    self.se_head = ProjectionHead(cfg.d_z, se_head_dim, rngs=rngs) if se_head_dim else None
    self.align_head = bool(align_head)

  def text_embedding(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """The CCL text anchor [B, d_fuse]: mean of the frozen token embeddings of `tokens` [B, L]
    over `mask`, through the trainable text projection."""
    if self.text_proj is None:
      raise ValueError('this model has no text projection (method.ccl_anchor != "text")')
    emb = jax.lax.stop_gradient(self.backbone.embed(tokens))
    m = mask.astype(emb.dtype)[..., None]
    mean = (emb * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    return self.text_proj(mean)

  def align(self, z: jax.Array) -> jax.Array:
    """The SE-CCL representation of z: the projection head's output, or z itself without a head
    (or with `align_head` off)."""
    return z if self.se_head is None or not self.align_head else self.se_head(z)

  def encode(self, inputs: Mapping[str, jax.Array], mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(projected modality embeddings [B,K,d_fuse], fused representation z [B,d_z]).

    inputs: modality -> [B, *shape] for at least this node's modalities;
    mask: [B, K] presence of this node's modalities in `self.modalities` order.
    """
    emb = {}
    for k, m in enumerate(self.modalities):
      present = mask[:, k].astype(bool).reshape((-1,) + (1,) * (inputs[m].ndim - 1))
      x = jnp.where(present, inputs[m], 0.0)  # keeps NaN/garbage of missing inputs out of the graph
      emb[m] = self.adapters[m](self.encoders[m](x))
    projected = self.connector.project(emb)
    return projected, self.connector.fuse(projected, mask)

  def prefix(self, z: jax.Array, instr: jax.Array, instr_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embeddings [B, P+Li, d] and key mask of soft prompt + instruction tokens."""
    prompt = self.connector.prompt(z)
    x = jnp.concatenate([prompt, self.backbone.embed(instr)], axis=1)
    mask = jnp.concatenate([jnp.ones(prompt.shape[:2], instr_mask.dtype), instr_mask], axis=1)
    return x, mask

  def __call__(self, z: jax.Array, instr: jax.Array, instr_mask: jax.Array, answer: jax.Array,
               answer_mask: jax.Array) -> jax.Array:
    """Teacher-forced logits predicting each answer token: [B, La, V]."""
    x, mask = self.prefix(z, instr, instr_mask)
    x = jnp.concatenate([x, self.backbone.embed(answer[:, :-1])], axis=1)
    mask = jnp.concatenate([mask, answer_mask[:, :-1]], axis=1)
    logits, _ = self.backbone(x, mask)
    la = answer.shape[1]
    return logits[:, -la:]

  def generate(self, z: jax.Array, instr: jax.Array, instr_mask: jax.Array, max_len: int,
               use_cache: bool = True) -> jax.Array:
    """Greedy decoding of `max_len` answer tokens [B, max_len] after prompt + instruction."""
    x, mask = self.prefix(z, instr, instr_mask)
    b, t0, _ = x.shape
    total = t0 + max_len
    full_mask = jnp.concatenate([mask, jnp.ones((b, max_len), mask.dtype)], axis=1)
    if not use_cache:
      return self._generate_recompute(x, full_mask, max_len)
    cache = self.backbone.init_cache(b, total, x.dtype)
    logits, cache = self.backbone(x, full_mask, 0, cache)
    first = jnp.argmax(logits[:, -1], axis=-1)
    backbone = self.backbone

    def step(carry, i):
      tok, cache = carry
      logits, cache = backbone(backbone.embed(tok)[:, None], full_mask, t0 + i, cache)
      nxt = jnp.argmax(logits[:, -1], axis=-1)
      return (nxt, cache), tok

    (_, _), toks = jax.lax.scan(step, (first, cache), jnp.arange(max_len))
    return toks.T

  def _generate_recompute(self, x, full_mask, max_len):
    """Reference decoding that reruns the full sequence every step (no cache)."""
    t0 = x.shape[1]
    toks = []
    for i in range(max_len):
      logits, _ = self.backbone(x, full_mask[:, :t0 + i])
      tok = jnp.argmax(logits[:, -1], axis=-1)
      toks.append(tok)
      x = jnp.concatenate([x, self.backbone.embed(tok)[:, None]], axis=1)
    return jnp.stack(toks, axis=1)
