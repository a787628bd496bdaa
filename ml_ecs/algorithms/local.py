"""Local training: no communication. Each client trains alone on its own data and the public split;
the server trains alone on the public split. The floor every collaborative method must beat."""
from __future__ import annotations

from ml_ecs.algorithms.base import Aggregated, Algorithm
from ml_ecs.algorithms.fedavg import PLAIN


class Local(Algorithm):
  """Nothing is uploaded or aggregated (`method.communicate = False`)."""
  name = 'local'
  fields = {**PLAIN, 'communicate': False}

  def aggregate(self, setup, state, uploads, key) -> Aggregated:
    del setup, uploads, key
    return Aggregated(state.global_shared, state.algorithm, (), {})
