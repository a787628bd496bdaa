"""ml_ecs/models/barrier.py: the residual stream's gradient is materialised once per block (a conditional in
the compiled backward pass, kept a conditional under vmap), and values and gradients are unchanged."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ml_ecs.models import decoder
from ml_ecs.models.barrier import materialized_cotangent

CFG = ml_collections.ConfigDict(dict(width=32, layers=4, heads=2, mlp_ratio=2, max_len=8, lora_rank=2,
                                     lora_alpha=4.0, lora_targets=decoder.LORA_TARGETS))


def _grad_fn():
  model = decoder.DecoderLM(CFG, 11, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape, a.dtype), state)
  mask = jnp.ones((3, 8), bool)

  def loss(st, x):
    logits, _ = nnx.merge(graphdef, st)(x, mask)
    return jnp.mean(jnp.tanh(logits) ** 2)

  x = jax.random.normal(jax.random.key(2), (3, 8, CFG.width))
  return jax.grad(loss), state, x


def _stack(tree):
  """Two runs on a leading axis (the second slightly different)."""
  return jax.tree.map(lambda a: jnp.stack([a, a * 1.01]), tree)


def _vmapped_hlo(grad, state, x) -> str:
  """The optimised HLO of `grad` vmapped over two runs."""
  return jax.jit(jax.vmap(grad)).lower(_stack(state), _stack(x)).compile().as_text()


def _largest_fusion(hlo: str) -> int:
  """The most operands of any fusion in an optimised HLO text."""
  return max(len(re.findall(r'%[\w.\-]+', line.split(' fusion(', 1)[1].split(')', 1)[0]))
             for line in hlo.splitlines() if ' fusion(' in line and '=' in line)


def test_identity_and_its_gradient():
  x = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
  f = lambda v: jnp.sum(jnp.sin(materialized_cotangent(v)) * v)
  g = lambda v: jnp.sum(jnp.sin(v) * v)
  np.testing.assert_array_equal(materialized_cotangent(x), x)
  np.testing.assert_array_equal(jax.jit(jax.grad(f))(x), jax.jit(jax.grad(g))(x))
  np.testing.assert_array_equal(jax.vmap(jax.grad(f))(x), jax.vmap(jax.grad(g))(x))
  # a non-finite gradient passes unchanged (the conditional's other branch)
  bad = x.at[0, 0].set(jnp.inf)
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(materialized_cotangent(v) * bad))(x), bad)


def test_backward_pass_is_cut_per_block_under_vmap(monkeypatch):
  grad, state, x = _grad_fn()
  runs = jax.jit(jax.vmap(grad))
  hlo = _vmapped_hlo(grad, state, x)
  # three cuts per block (before it, between attention and MLP, at the MLP's hidden layer), none turned
  # into a select by vmap
  assert hlo.count(' conditional(') == 3 * CFG.layers
  with_cuts = _largest_fusion(hlo)
  monkeypatch.setattr(decoder, 'materialized_cotangent', lambda v: v)
  grad_plain, _, _ = _grad_fn()
  plain = _vmapped_hlo(grad_plain, state, x)
  assert plain.count(' conditional(') == 0
  # without the cuts XLA fuses the chain of every later block into each consumer
  assert _largest_fusion(plain) > 2 * with_cuts, (_largest_fusion(plain), with_cuts)
  got, want = runs(_stack(state), _stack(x)), jax.jit(jax.vmap(grad_plain))(_stack(state), _stack(x))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _activation_backward_transposed(hlo: str) -> int:
  """How many fused computations compute the tanh-GELU's backward (its constant 0.044715 * sqrt(2 / pi)) into
  a transposed layout."""
  comps = re.split(r'\n(?=%?[\w.\-]+ \()', hlo)
  return sum(1 for c in comps if c.startswith(('%fused', 'fused')) and ' transpose(' in c and '0.0356774' in c)


def test_activation_backward_is_not_fused_into_a_transpose(monkeypatch):
  # The LoRA B gradient of the MLP's first layer reads the hidden gradient transposed; uncut, XLA:CPU fuses
  # the activation's backward into that transpose (on the comparison's server LM, a third of its stage).
  grad, state, x = _grad_fn()
  hlo = _vmapped_hlo(grad, state, x)
  assert _activation_backward_transposed(hlo) == 0
  # Without the MLP's cut (each block's third; the other two kept) the fusion is back.
  calls = []

  def without_mlp_cut(v):
    calls.append(None)
    return v if len(calls) % 3 == 0 else materialized_cotangent(v)

  monkeypatch.setattr(decoder, 'materialized_cotangent', without_mlp_cut)
  grad_uncut, _, _ = _grad_fn()
  uncut = _vmapped_hlo(grad_uncut, state, x)
  assert uncut.count(' conditional(') == 2 * CFG.layers
  assert _activation_backward_transposed(uncut) > 0
