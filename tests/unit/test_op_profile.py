"""benchmarks/lib/op_profile.py: a compiled program's time per HLO operator from a profiler trace."""
import jax
import jax.numpy as jnp

from benchmarks.lib import op_profile


def test_op_times_names_the_programs_operators_with_their_hlo():
  f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum(0))
  a, b = jnp.ones((256, 512)), jnp.ones((512, 256))
  compiled = f.lower(a, b).compile()
  lines = op_profile.hlo_lines(compiled)
  ops, totals = op_profile.op_times(lambda: compiled(a, b), calls=3, instructions=lines)
  assert ops and totals['executor'] > 0 and totals['executor'] >= max(s for s, _ in ops.values())
  assert all(n >= 1 for _, n in ops.values())
  assert any('dot(' in lines[k] or 'fusion(' in lines[k] for k in ops)   # the matmul (or its fusion) is timed
  rows = op_profile.table(ops, lines, top=2)
  assert len(rows) == 2 + min(2, len(ops)) and rows[2].startswith('| `')
  assert op_profile.CONTAINERS.match('while.342') and not op_profile.CONTAINERS.match('while_fusion')
