"""Orbax checkpoints of a federation's `State`, with the metric rows written so far.

The state pytree (nnx States, optax states, tuples of cohorts) is saved as a flat
{key path: array} dict so that orbax sees plain arrays, and restored onto a
template of the same structure (a freshly initialised state of the same config),
back on the template's devices and shardings (numpy leaves of a host_state federation stay
writable host arrays). With several processes every process calls `save` and `restore`; each writes
and reads the shards on its own devices. Orbax finalises a step atomically
(written under a temporary name, then renamed), so a killed run never leaves a
half-written step that looks complete; a step that is damaged all the same is moved
aside (to `checkpoints_damaged/`, with a warning naming both places) and the previous one is
used, so the rerun that trains that round again can save it again.
The trainer stores the run's config in every step's meta (`meta['config']`): a workdir whose
config.json was lost is still checked against it (`checkpoint_config`).
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp


def _flatten(tree: Any) -> dict[str, Any]:
  """{key path: leaf} as host arrays; arrays that span several processes stay global device arrays,
  so that each process writes (and reads back) only the shards on its own devices."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): x if isinstance(x, jax.Array) and not x.is_fully_addressable
          else np.asarray(x) for path, x in leaves}


def _abandoned_read(unraisable: Any) -> bool:
  """Whether an unraisable exception is a read of a failed restore arriving after orbax closed its event
  loop: RuntimeError('Event loop is closed') raised in asyncio's `call_soon_threadsafe`."""
  if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != 'Event loop is closed':
    return False
  frames = [f.f_code.co_name for f, _ in traceback.walk_tb(unraisable.exc_traceback)]
  return frames[-2:] == ['call_soon_threadsafe', '_check_closed']


@functools.cache   # installed once
def _quiet_abandoned_reads() -> None:
  """Drops the abandoned reads of a failed restore; every other unraisable exception goes to the hook that
  was there before.

  When one array of a step cannot be read, orbax's restore raises and closes its event loop while the
  step's other reads are still in flight; each of them then fails to deliver its result, and Python
  printed one traceback per read on stderr (450-540 for a state of 600 arrays) after our single warning that
  names the damaged step. Installed before the first restore (those reads can finish before the
  restore's exception reaches us)."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _abandoned_read(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook


def checkpoint_steps(directory: str) -> list[int]:
  """The step directories under `directory` (whatever their state)."""
  try:
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
  except (FileNotFoundError, NotADirectoryError):
    return []


def checkpoint_config(directory: str) -> tuple[int | None, dict | None]:
  """(step, config) of the newest step under `directory` whose meta holds the run's config, read
  straight from its JSON (no template needed); (None, None) when there is no such step."""
  for step in reversed(checkpoint_steps(directory)):
    path = os.path.join(directory, str(step), 'meta', 'metadata')
    try:
      with open(path) as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue   # damaged or unfinished: an older step may still say
    if isinstance(meta, dict) and isinstance(meta.get('config'), dict):
      return step, meta['config']
  return None, None


class Checkpointer:
  """Keeps the newest `max_to_keep` round checkpoints under `directory`."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def save(self, step: int, state: Any, meta: dict[str, Any] | None = None) -> None:
    """Writes `state` (a pytree of arrays) and `meta` (JSON) as step `step`, and waits for it."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_flatten(state)),
                                                    meta=ocp.args.JsonSave(meta or {})), force=True)
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(state, meta) saved at `step` (default latest), in the structure and shardings of `template`."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {self.directory}')
    _quiet_abandoned_reads()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_flatten(template)), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:   # orbax's own message names no checkpoint
      raise ValueError(f'checkpoint {self.step_dir(step)} does not match this config ({type(e).__name__}: '
                       f'{str(e)[:200]})') from e
    flat = restored['state']
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, ref in paths:
      key = jax.tree_util.keystr(path)
      if key not in flat or np.shape(flat[key]) != np.shape(ref):
        raise ValueError(f'checkpoint {self.step_dir(step)} does not match this config at {key}')
      value = flat[key]
      if isinstance(ref, jax.Array):   # restored onto the template's sharding (global arrays stay global)
        same = isinstance(value, jax.Array) and value.sharding == ref.sharding and value.dtype == ref.dtype
        leaves.append(value if same else jax.device_put(np.asarray(value, dtype=ref.dtype), ref.sharding))
      else:   # host (numpy) leaves come back writable: train.host_state updates them in place
        leaves.append(np.array(value, dtype=ref.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves), dict(restored['meta'] or {})

  def restore_latest_valid(self, template: Any, warn: Callable[[str], None]) -> tuple[int, Any, dict] | None:
    """The newest step that restores cleanly, as (step, state, meta); a damaged newer step is moved
    aside to `<directory>_damaged/<step>-<time>` (reported through `warn`, naming both) so that
    the step can be written again. None if there is none."""
    for step in reversed(self.steps()):
      try:
        state, meta = self.restore(template, step)
        return step, state, meta
      except Exception as e:  # noqa: BLE001  (any damage: missing files, bad bytes, wrong shapes)
        reason = f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
        moved = self.move_aside(step)
        warn(f'WARNING: checkpoint {self.step_dir(step)} cannot be restored ({reason}); moved it to {moved} '
             'and falling back to the previous one')
    return None

  def move_aside(self, step: int) -> str:
    """Renames step `step` out of the manager's directory (process 0 alone); returns where it went."""
    target = os.path.join(self.directory + '_damaged', f'{step}-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}')
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(self.step_dir(step), target)
    self.manager.reload()   # forget the step: saving it again is a new step, not StepAlreadyExistsError
    return target

  def close(self) -> None:
    self.manager.close()
