"""Communication accounting: what crosses the network in a round, in bytes."""
from __future__ import annotations

import numpy as np


def round_bytes(shared_bytes: np.ndarray, reps_bytes: np.ndarray, sampled: np.ndarray,
                send_lora: bool, send_reps: bool) -> dict[str, int]:
  """Bytes up/down of a round for the `sampled` client ids, split into LoRA and representations.

  shared_bytes[c]: client c's shared LoRA (backbone LoRA + adapters of its modalities);
  reps_bytes[c]: fused representations of its public subset. Down: the aggregated shared
  LoRA and the server's representations of that subset; up: the client's own of both.
  """
  lora = int(shared_bytes[sampled].sum()) if send_lora else 0
  reps = int(reps_bytes[sampled].sum()) if send_reps else 0
  return {'comm/bytes_up': lora + reps, 'comm/bytes_down': lora + reps,
          'comm/lora_bytes_up': lora, 'comm/reps_bytes_up': reps,
          'comm/lora_bytes_down': lora, 'comm/reps_bytes_down': reps}
