"""What XLA says about a compiled executable: FLOPs (cost analysis) and collectives in its HLO."""
from __future__ import annotations

COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')


def xla_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled executable by XLA's cost analysis (None where unavailable)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return float(ca['flops']) if ca and ca.get('flops') is not None else None


def count_collectives(compiled) -> dict[str, int]:
  """Collective ops of each kind in a compiled executable's optimised HLO."""
  lines = (compiled.as_text() or '').splitlines()
  return {op: sum(1 for ln in lines if f' {op}(' in ln or f' {op}-start(' in ln) for op in COLLECTIVES}


def collectives_note(compiled) -> str:
  coll = count_collectives(compiled)
  return 'collectives in HLO: ' + (', '.join(f'{n} {op}' for op, n in coll.items() if n) or 'none')
