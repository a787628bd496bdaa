"""Local training: no communication. Each client trains alone on its own data and the public split;
the server trains alone on the public split. The floor every collaborative method must beat."""
from __future__ import annotations

from ml_ecs.algorithms.base import Algorithm
from ml_ecs.algorithms.fedavg import PLAIN


class Local(Algorithm):
  """Nothing is uploaded or aggregated (`method.communicate = False`: the round skips aggregation)."""
  name = 'local'
  fields = {**PLAIN, 'communicate': False}
