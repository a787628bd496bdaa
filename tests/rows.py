"""Comparison of metrics rows from two runs that should agree to float tolerance."""
import numpy as np


def assert_rows_close(expected: list[dict], got: list[dict], rtol: float = 1e-4, atol: float = 1e-5) -> None:
  """Every numeric entry (and dict of numbers) of `got` matches `expected`; times and texts are skipped."""
  assert len(got) == len(expected)
  for r1, r2 in zip(expected, got):
    for key, v1 in r1.items():
      if key.startswith('time/') or isinstance(v1, str):
        continue
      v2 = r2[key]
      if isinstance(v1, dict):
        assert v1.keys() == v2.keys(), key
        np.testing.assert_allclose(list(v2.values()), list(v1.values()), rtol=rtol, atol=max(atol, 1e-4),
                                   err_msg=key)
      else:
        np.testing.assert_allclose(v2, v1, rtol=rtol, atol=atol, err_msg=key)
