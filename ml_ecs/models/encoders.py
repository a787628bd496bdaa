"""Modality encoders. Each maps one modality's samples [B, *shape] to [B, d_out].

Every input is viewed as a sequence [B, L, C]: a time series as it is, a feature
vector as L features of one channel, an image as rows of pixels. Clients pick
an architecture per modality in the config, which is what makes edge models
structurally heterogeneous.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ml_ecs.models.conv import conv_function

ENCODER_TYPES = ('mlp', 'conv1d', 'transformer')
CONV_ENCODERS = ('conv1d',)   # the encoder types whose convolution implementation is a choice (conv_impl)


def as_sequence_shape(shape: Sequence[int]) -> tuple[int, int]:
  """The [L, C] view of a per-sample shape."""
  shape = tuple(shape)
  if len(shape) == 1:
    return shape[0], 1
  if len(shape) == 2:
    return shape
  if len(shape) == 3:
    return shape[0], shape[1] * shape[2]
  raise ValueError(f'modality sample shape {shape} not supported: expected 1 to 3 dims')


class MLPEncoder(nnx.Module):
  """Flatten -> Linear -> GELU -> Linear."""

  def __init__(self, shape, width: int, d_out: int, *, rngs: nnx.Rngs):
    length, ch = as_sequence_shape(shape)
    self.l1 = nnx.Linear(length * ch, width, rngs=rngs)
    self.l2 = nnx.Linear(width, d_out, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.gelu(self.l1(x.reshape(x.shape[0], -1))))


class Conv1DEncoder(nnx.Module):
  """Two 1-D convolutions over the sequence axis, mean pool, Linear. `conv_impl`: how the convolutions
  run (ml_ecs.models.conv; the same parameters and results either way)."""

  def __init__(self, shape, width: int, d_out: int, *, rngs: nnx.Rngs, kernel: int = 3, conv_impl: str = 'xla'):
    self.seq_shape = as_sequence_shape(shape)
    conv = conv_function(conv_impl)
    self.c1 = nnx.Conv(self.seq_shape[1], width, (kernel,), rngs=rngs, conv_general_dilated=conv)
    self.c2 = nnx.Conv(width, width, (kernel,), strides=(2,), rngs=rngs, conv_general_dilated=conv)
    self.out = nnx.Linear(width, d_out, rngs=rngs)

  def __call__(self, x):
    h = x.reshape(x.shape[0], *self.seq_shape)
    h = jax.nn.gelu(self.c2(jax.nn.gelu(self.c1(h))))
    return self.out(h.mean(axis=1))


class TransformerEncoder(nnx.Module):
  """Linear token embedding + learned positions, one self-attention block, mean pool."""

  def __init__(self, shape, width: int, d_out: int, *, rngs: nnx.Rngs, heads: int = 2):
    self.seq_shape = as_sequence_shape(shape)
    length, ch = self.seq_shape
    self.embed = nnx.Linear(ch, width, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (length, width)))
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.mlp = nnx.Linear(width, width, rngs=rngs)
    self.out = nnx.Linear(width, d_out, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x.reshape(x.shape[0], *self.seq_shape)) + self.pos[...]
    h = h + self.attn(self.ln1(h))
    h = h + jax.nn.gelu(self.mlp(self.ln2(h)))
    return self.out(h.mean(axis=1))


def make_encoder(kind: str, shape: Sequence[int], width: int, d_out: int, *, rngs: nnx.Rngs,
                 conv_impl: str = 'xla') -> nnx.Module:
  """Builds the encoder named `kind` for samples of `shape` (convolutions through `conv_impl`)."""
  classes = {'mlp': MLPEncoder, 'conv1d': Conv1DEncoder, 'transformer': TransformerEncoder}
  if kind not in classes:
    raise ValueError(f'unknown encoder type {kind!r}: expected one of {ENCODER_TYPES}')
  extra = {'conv_impl': conv_impl} if kind in CONV_ENCODERS else {}
  return classes[kind](shape, width, d_out, rngs=rngs, **extra)
