"""Orbax checkpoints of a federation's training state.

The state pytree (nnx States, optax states, lists of cohorts) is saved as a flat
{key path: array} dict so that orbax sees plain arrays, and restored onto a
template of the same structure (a freshly built federation of the same config).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _flatten(tree: Any) -> dict[str, np.ndarray]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


class Checkpointer:
  """Keeps the last `max_to_keep` round checkpoints under `directory`."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.manager = ocp.CheckpointManager(os.path.abspath(directory),
                                         options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def save(self, step: int, state: Any) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(_flatten(state)))
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, template: Any, step: int | None = None) -> Any:
    """The saved state at `step` (default latest), in the structure of `template`."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {self.manager.directory}')
    flat = self.manager.restore(step, args=ocp.args.StandardRestore(_flatten(template)))
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, ref in paths:
      key = jax.tree_util.keystr(path)
      if key not in flat or np.shape(flat[key]) != np.shape(ref):
        raise ValueError(f'checkpoint step {step} in {self.manager.directory} does not match this config at {key}')
      leaves.append(jax.numpy.asarray(flat[key], dtype=ref.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)

  def close(self) -> None:
    self.manager.close()
