"""Communication accounting: what crosses the network in a round, in bytes."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Accounting:
  """Per-client payload sizes (indexed by client id) and the bytes of every model in the federation."""
  shared_bytes: np.ndarray   # client's shared LoRA: backbone LoRA + adapters of its modalities
  reps_bytes: np.ndarray     # client's fused representations of its public subset
  total_model_bytes: int     # all edge models (trainables + frozen backbone each) + the server model

  def round_bytes(self, sampled: np.ndarray, send_lora: bool, send_reps: bool,
                  sent: np.ndarray | None = None) -> dict[str, float]:
    """Bytes up/down of a round with the `sampled` client ids (`sent`: those whose upload was sent,
    default all), and their ratio to all model bytes."""
    out = round_bytes(self.shared_bytes, self.reps_bytes, sampled, send_lora, send_reps, sent)
    out['comm/ratio'] = (out['comm/bytes_up'] + out['comm/bytes_down']) / self.total_model_bytes
    return out


def accounting(clients: Sequence[tuple[int, Sequence[int], int, int]], leaf_bytes: Sequence[tuple[int, int]],
               d_z: int, itemsize: int, server_bytes: int) -> Accounting:
  """Accounting of a federation.

  clients: (client id, indices of its modalities, number of public samples, bytes of its whole
  model) per client; leaf_bytes: (modality index or -1, bytes) of every shared leaf.
  """
  n = len(clients)
  shared, reps = np.zeros(n, np.int64), np.zeros(n, np.int64)
  total = server_bytes
  for cid, mods, num_public, model_bytes in clients:
    shared[cid] = sum(b for m, b in leaf_bytes if m < 0 or m in mods)
    reps[cid] = num_public * d_z * itemsize
    total += model_bytes
  return Accounting(shared, reps, int(total))


def round_bytes(shared_bytes: np.ndarray, reps_bytes: np.ndarray, sampled: np.ndarray,
                send_lora: bool, send_reps: bool, sent: np.ndarray | None = None) -> dict[str, int]:
  """Bytes up/down of a round, split into LoRA and representations.

  Down, to every `sampled` client: the aggregated shared LoRA and the server's representations
  of its public subset. Up, from the clients in `sent` (default: all sampled): the client's own
  of both. A client that dropped out before its upload sends nothing; a late upload was sent
  (the server discards or discounts it), so it counts.
  """
  sent = sampled if sent is None else sent
  lora_down = int(shared_bytes[sampled].sum()) if send_lora else 0
  reps_down = int(reps_bytes[sampled].sum()) if send_reps else 0
  lora_up = int(shared_bytes[sent].sum()) if send_lora else 0
  reps_up = int(reps_bytes[sent].sum()) if send_reps else 0
  return {'comm/bytes_up': lora_up + reps_up, 'comm/bytes_down': lora_down + reps_down,
          'comm/lora_bytes_up': lora_up, 'comm/reps_bytes_up': reps_up,
          'comm/lora_bytes_down': lora_down, 'comm/reps_bytes_down': reps_down}
