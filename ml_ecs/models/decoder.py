"""GPT-2-style decoder-only language model with LoRA and a KV cache.

Pre-LayerNorm blocks, learned positions, tied input/output embeddings, causal
plus key-padding attention mask. Base weights are `Frozen`; each block has a
learned pair of gates that mixes its shared and private LoRA adapters.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from ml_ecs.models.lora import LoRALinear
from ml_ecs.models.variables import Frozen, Gate

LORA_TARGETS = ('qkv', 'attn_out', 'mlp_in', 'mlp_out')


class KVCache(NamedTuple):
  """Keys and values of every layer: [layers, B, T_max, heads, head_dim] each."""
  k: jax.Array
  v: jax.Array


class LayerNorm(nnx.Module):
  """LayerNorm with frozen scale and bias."""

  def __init__(self, dim: int):
    self.scale = Frozen(jnp.ones((dim,)))
    self.bias = Frozen(jnp.zeros((dim,)))

  def __call__(self, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...]


class Block(nnx.Module):
  """One pre-LN transformer block."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, r, a = cfg.width, cfg.lora_rank, cfg.lora_alpha
    rank = lambda name: r if name in cfg.lora_targets else 0
    self.heads = cfg.heads
    self.ln1 = LayerNorm(d)
    self.qkv = LoRALinear(d, 3 * d, rank('qkv'), a, rngs=rngs)
    self.attn_out = LoRALinear(d, d, rank('attn_out'), a, rngs=rngs,
                               init_std=0.02 / (2 * cfg.layers) ** 0.5)
    self.ln2 = LayerNorm(d)
    self.mlp_in = LoRALinear(d, cfg.mlp_ratio * d, rank('mlp_in'), a, rngs=rngs)
    self.mlp_out = LoRALinear(cfg.mlp_ratio * d, d, rank('mlp_out'), a, rngs=rngs,
                              init_std=0.02 / (2 * cfg.layers) ** 0.5)
    # Gate logits; gates = 2 * sigmoid(logit) start at 1 for both adapters.
    self.gate = Gate(jnp.zeros((2,)))

  def __call__(self, x, key_mask, start, k_cache=None, v_cache=None):
    """x [B,T,d] at absolute positions start..start+T-1; key_mask [B,S].

    Without a cache S == T; with one, S is the cache length and the new keys
    and values are written at `start`.
    """
    b, t, d = x.shape
    hd = d // self.heads
    g = 2.0 * jax.nn.sigmoid(self.gate[...])
    q, k, v = jnp.split(self.qkv(self.ln1(x), g), 3, axis=-1)
    q, k, v = (y.reshape(b, t, self.heads, hd) for y in (q, k, v))
    if k_cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
    s = k.shape[1]
    q_pos = start + jnp.arange(t)
    allowed = (jnp.arange(s)[None, :] <= q_pos[:, None])[None] & key_mask[:, None, :].astype(bool)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(hd).astype(x.dtype)
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(scores.dtype).min)
    attn = jax.nn.softmax(scores, axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(b, t, d)
    x = x + self.attn_out(y, g)
    x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x), g)), g)
    return x, k, v


class DecoderLM(nnx.Module):
  """GPT-2-style LM over input embeddings (soft prompt and tokens mixed freely)."""

  def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vocab_size = vocab_size
    self.wte = Frozen(0.02 * jax.random.normal(rngs.params(), (vocab_size, cfg.width)))
    self.wpe = Frozen(0.01 * jax.random.normal(rngs.params(), (cfg.max_len, cfg.width)))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
    self.ln_f = LayerNorm(cfg.width)

  def embed(self, tokens: jax.Array) -> jax.Array:
    return self.wte[...][tokens]

  def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    shape = (self.cfg.layers, batch, length, self.cfg.heads, self.cfg.width // self.cfg.heads)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def __call__(self, x: jax.Array, key_mask: jax.Array, start: int | jax.Array = 0,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Logits [B,T,V] for input embeddings x [B,T,d] at positions start.., and the updated cache."""
    t = x.shape[1]
    h = x + jax.lax.dynamic_slice_in_dim(self.wpe[...], start, t, axis=0)[None]
    ks, vs = [], []
    for i, block in enumerate(self.blocks):
      kc = None if cache is None else cache.k[i]
      vc = None if cache is None else cache.v[i]
      h, k, v = block(h, key_mask, start, kc, vc)
      ks.append(k)
      vs.append(v)
    logits = self.ln_f(h) @ self.wte[...].T
    new_cache = None if cache is None else KVCache(jnp.stack(ks), jnp.stack(vs))
    return logits, new_cache
