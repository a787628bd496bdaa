"""GPT-2-style decoder-only language model with LoRA and a KV cache.

Pre-LayerNorm blocks, learned positions, tied input/output embeddings, causal
plus key-padding attention mask. Base weights are `Frozen`; each block has a
learned pair of gates that mixes its shared and private LoRA adapters.

Backbone config fields (ml_collections): width, layers, heads, mlp_ratio,
max_len, lora_rank, lora_alpha, lora_targets, and optional architecture fields
whose defaults are the original behaviour (the ones a Hugging Face GPT-2
checkpoint sets, see `ml_ecs.backbones.hf_gpt2`):

- ``activation``: MLP nonlinearity, a key of `ACTIVATIONS` (default
  ``'gelu_new'``, the tanh approximation, which is what ``jax.nn.gelu`` computes;
  ``'gelu'`` is the exact erf form).
- ``ln_eps``: LayerNorm epsilon (default 1e-5, as GPT-2).
- ``mlp_dim``: MLP hidden size; overrides ``mlp_ratio * width`` when set (GPT-2's
  ``n_inner``).
- ``scale_attn_weights``: divide attention scores by sqrt(head_dim) (default True).
- ``scale_attn_by_inverse_layer_idx``: also divide them by layer index + 1
  (default False).
- ``gates``: form of the shared/private mixing gates, ``'scaled'`` (default,
  2 * sigmoid) or ``'convex'``; ``gate_init``: the convex shared-gate logit (default 2.0).
  Set from ``method.gates`` / ``method.gate_init`` by `ml_ecs.models.multimodal.model_options`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from ml_ecs.models.barrier import materialized_cotangent
from ml_ecs.models.lora import LoRALinear
from ml_ecs.models.variables import Frozen, Gate

LORA_TARGETS = ('qkv', 'attn_out', 'mlp_in', 'mlp_out')
GATE_FORMS = ('scaled', 'convex')
# Gate logits under which `Block.mix_gates()` is (1, 0): the shared adapter alone at full weight
# (the global model of `ml_ecs.algorithms.ml_ecs.amt.global_view`).
SHARED_ONLY_LOGITS = {'scaled': (0.0, -40.0), 'convex': (40.0, 0.0)}

# MLP activations by their Hugging Face names (transformers.activations.ACT2FN).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': jax.nn.gelu,            # tanh approximation (jax's default)
    'gelu_pytorch_tanh': jax.nn.gelu,
    'gelu_fast': jax.nn.gelu,
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """The MLP activation called `name` (a key of ACTIVATIONS)."""
  if name not in ACTIVATIONS:
    raise ValueError(f'backbone activation {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def mlp_dim(cfg: ml_collections.ConfigDict) -> int:
  """Hidden size of the MLP: cfg.mlp_dim if set, else cfg.mlp_ratio * cfg.width."""
  dim = cfg.get('mlp_dim', None)
  return int(dim) if dim else cfg.mlp_ratio * cfg.width


class KVCache(NamedTuple):
  """Keys and values of every layer: [layers, B, T_max, heads, head_dim] each."""
  k: jax.Array
  v: jax.Array


class LayerNorm(nnx.Module):
  """LayerNorm with frozen scale and bias."""

  def __init__(self, dim: int, eps: float = 1e-5):
    self.scale = Frozen(jnp.ones((dim,)))
    self.bias = Frozen(jnp.zeros((dim,)))
    self.eps = eps

  def __call__(self, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class Block(nnx.Module):
  """One pre-LN transformer block."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, layer_idx: int = 0):
    d, r, a = cfg.width, cfg.lora_rank, cfg.lora_alpha
    rank = lambda name: r if name in cfg.lora_targets else 0
    eps = cfg.get('ln_eps', 1e-5)
    self.heads = cfg.heads
    self.activation = cfg.get('activation', 'gelu_new')
    activation_fn(self.activation)  # fail at construction on an unknown name
    self.scale_attn_weights = bool(cfg.get('scale_attn_weights', True))
    # Extra division of the attention scores (GPT-2's scale_attn_by_inverse_layer_idx).
    self.inv_layer_scale = (float(layer_idx + 1)
                            if cfg.get('scale_attn_by_inverse_layer_idx', False) else None)
    self.ln1 = LayerNorm(d, eps)
    self.qkv = LoRALinear(d, 3 * d, rank('qkv'), a, rngs=rngs)
    self.attn_out = LoRALinear(d, d, rank('attn_out'), a, rngs=rngs,
                               init_std=0.02 / (2 * cfg.layers) ** 0.5)
    self.ln2 = LayerNorm(d, eps)
    self.mlp_in = LoRALinear(d, mlp_dim(cfg), rank('mlp_in'), a, rngs=rngs)
    self.mlp_out = LoRALinear(mlp_dim(cfg), d, rank('mlp_out'), a, rngs=rngs,
                              init_std=0.02 / (2 * cfg.layers) ** 0.5)
    # Gate logits (see `mix_gates`): 'scaled' starts both adapters at 1; 'convex' starts the
    # shared weight at sigmoid(gate_init) (0.88 for 2.0), the private one at 1 - that.
    self.gate_form = cfg.get('gates', 'scaled')
    if self.gate_form not in GATE_FORMS:
      raise ValueError(f'backbone gates {self.gate_form!r}: expected one of {GATE_FORMS}')
    init = jnp.array([cfg.get('gate_init', 2.0), 0.0]) if self.gate_form == 'convex' else jnp.zeros((2,))
    self.gate = Gate(init)

  def mix_gates(self) -> jax.Array:
    """[2] weights (shared, private) of the two LoRA adapters, as used by `__call__`.

    'scaled': 2 * sigmoid(logits), each in (0, 2), both 1 at init (the original form);
    'convex': (g, 1 - g) with g = sigmoid(logit_shared - logit_private), i.e. the AMT mix
    g * shared + (1 - g) * private: one learned weight per layer trades the federated
    (shared) adapter against the client's own (private) one, so the two always sum to 1;
    initialised toward shared (g = sigmoid(gate_init)).
    The one definition of the gate form: export (`ml_ecs.backbones.peft_io`) reads the
    gates through this method.
    """
    if self.gate_form == 'convex':
      g = jax.nn.sigmoid(self.gate[...][0] - self.gate[...][1])
      return jnp.stack([g, 1.0 - g])
    return 2.0 * jax.nn.sigmoid(self.gate[...])

  def __call__(self, x, key_mask, start, k_cache=None, v_cache=None):
    """x [B,T,d] at absolute positions start..start+T-1; key_mask [B,S].

    Without a cache S == T; with one, S is the cache length and the new keys
    and values are written at `start`.
    """
    b, t, d = x.shape
    hd = d // self.heads
    g = self.mix_gates()
    q, k, v = jnp.split(self.qkv(self.ln1(x), g), 3, axis=-1)
    q, k, v = (y.reshape(b, t, self.heads, hd) for y in (q, k, v))
    if k_cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
    s = k.shape[1]
    q_pos = start + jnp.arange(t)
    allowed = (jnp.arange(s)[None, :] <= q_pos[:, None])[None] & key_mask[:, None, :].astype(bool)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k)
    if self.scale_attn_weights:
      scores = scores / jnp.sqrt(hd).astype(x.dtype)
    if self.inv_layer_scale is not None:
      scores = scores / jnp.asarray(self.inv_layer_scale, x.dtype)
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(scores.dtype).min)
    attn = jax.nn.softmax(scores, axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(b, t, d)
    x = materialized_cotangent(x + self.attn_out(y, g))
    # The MLP's hidden gradient is materialised too: its LoRA B gradient reads it transposed, and XLA:CPU
    # otherwise fuses the activation's backward into that transpose, a strided pass that cost a third of
    # the comparison's server stage (ml_ecs/models/barrier.py).
    h = materialized_cotangent(self.mlp_in(self.ln2(x), g))
    x = x + self.mlp_out(activation_fn(self.activation)(h), g)
    return x, k, v


class DecoderLM(nnx.Module):
  """GPT-2-style LM over input embeddings (soft prompt and tokens mixed freely)."""

  def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vocab_size = vocab_size
    self.wte = Frozen(0.02 * jax.random.normal(rngs.params(), (vocab_size, cfg.width)))
    self.wpe = Frozen(0.01 * jax.random.normal(rngs.params(), (cfg.max_len, cfg.width)))
    self.blocks = nnx.List([Block(cfg, rngs=rngs, layer_idx=i) for i in range(cfg.layers)])
    self.ln_f = LayerNorm(cfg.width, cfg.get('ln_eps', 1e-5))

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
      h, k, v = block(materialized_cotangent(h), key_mask, start, kc, vc)
      ks.append(k)
      vs.append(v)
    logits = self.ln_f(h) @ self.wte[...].T
    new_cache = None if cache is None else KVCache(jnp.stack(ks), jnp.stack(vs))
    return logits, new_cache
