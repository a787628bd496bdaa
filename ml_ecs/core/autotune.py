"""Measured execution choices: which of a few equivalent implementations runs fastest on this machine,
timed once at setup and cached.

`fastest` times jitted candidates on the same arguments and keeps the quickest; `conv_impl` uses it to pick
a cohort's convolution (`ml_ecs.models.conv`: XLA's convolution or the batched-matmul form) from its
encoders' forward and backward pass vmapped over the cohort's clients. A choice is stored under
(backend, device kind, JAX version, candidates' revision, case) in `autotune.json` (`cache_path`), so a
second run with the same shapes reads it instead of measuring (a few seconds per cohort with convolutions)
and a resumed run makes the same choice as its first process.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ml_ecs.models.conv import CONV_IMPLS, CONV_SETTINGS
from ml_ecs.models.encoders import CONV_ENCODERS, make_encoder


def cache_path() -> str:
  """autotune.json beside the enabled JAX compilation cache, else in the user's cache folder
  ($XDG_CACHE_HOME or ~/.cache)/ml_ecs: a choice is measured once per machine and case, so a resumed
  run makes the same choice as its first process."""
  directory = jax.config.jax_compilation_cache_dir
  if directory:
    return os.path.join(os.path.dirname(os.path.abspath(directory)), 'autotune.json')
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'ml_ecs', 'autotune.json')


def _read(path: str | None) -> dict:
  if not path or not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):   # unreadable: measure again (and rewrite it whole)
    return {}


@contextlib.contextmanager
def _locked(path: str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _store(path: str, key: str, record: dict) -> dict:
  """Stores `record` unless a record of `key` is already there (another process measured the same case
  meanwhile: the first one stays, so every run on this machine makes the same choice); returns the stored
  one. Under a lock; written whole to a temp file, then renamed."""
  with _locked(path):
    table = _read(path)
    if table.get(key, {}).get('choice') in record['seconds']:
      return table[key]
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump({**table, key: record}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  return record


# The revision of the candidates' code: bump it when what a candidate runs changes (2: chunk 1 is a plain
# `lax.map`, ml_ecs.core.cohort_map), so that no choice measured on the old code is read back.
REVISION = 2


def _key(case: str) -> str:
  device = jax.devices()[0]
  return f'{device.platform}|{device.device_kind}|jax {jax.__version__}|r{REVISION}|{case}'


def cached(case: str, names, path: str | None) -> dict[str, Any] | None:
  """The record cached in `path` for this backend, device kind and `case` whose choice is one of `names`
  (`cached`: True), or None: lets a caller skip building its candidates."""
  hit = _read(path).get(_key(case))
  return {**hit, 'cached': True} if hit and hit.get('choice') in names else None


def fastest(case: str, candidates: dict[str, Callable[..., Any]], args: tuple, repeats: int = 3,
            path: str | None = None) -> tuple[str, dict[str, Any]]:
  """(name of the fastest candidate, record): each candidate is jitted, run once (compile), then timed
  `repeats` times on `args`; the record holds the best seconds per candidate. A record cached in `path`
  for this backend, device kind and `case` is returned without measuring (`cached`: True); when another
  process stored one while this one measured, its choice is returned (the first stored stays)."""
  hit = cached(case, candidates, path)
  if hit:
    return hit['choice'], hit
  times = {}
  for name, fn in candidates.items():
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))
    best = float('inf')
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      best = min(best, time.perf_counter() - t0)
    times[name] = best
  record = {'choice': min(times, key=times.get), 'seconds': times, 'case': case}
  stored = _store(path, _key(case), record) if path else record
  return stored['choice'], {**stored, 'seconds': times, 'cached': False}


def conv_impl(setting: str, encoder_types: dict[str, str], shapes: dict[str, tuple], width: int, d_out: int,
              clients: int, batch: int, path: str | None = None) -> tuple[str, dict[str, Any] | None]:
  """A cohort's convolution implementation for `train.conv_impl` = `setting`: as set, or with 'auto' the
  faster on its conv encoders' forward + backward pass over `clients` x `batch` samples (record returned;
  None when nothing was measured: a fixed setting, or no convolution in the cohort)."""
  if setting not in CONV_SETTINGS:
    raise ValueError(f'train.conv_impl={setting!r}: expected one of {CONV_SETTINGS}')
  convs = sorted(m for m, kind in encoder_types.items() if kind in CONV_ENCODERS)
  if setting != 'auto' or not convs:
    return ('xla' if setting == 'auto' else setting), None
  case = 'conv|' + ';'.join(f'{m}:{encoder_types[m]}:{tuple(shapes[m])}' for m in convs) + \
      f'|width={width}|d_out={d_out}|clients={clients}|batch={batch}'
  hit = cached(case, CONV_IMPLS, path)
  if hit:   # no encoders built at setup when the choice is known
    return hit['choice'], hit
  inputs = {m: jnp.ones((clients, batch, *shapes[m]), jnp.float32) for m in convs}

  def candidate(impl):
    encoders = {m: make_encoder(encoder_types[m], shapes[m], width, d_out, rngs=nnx.Rngs(0), conv_impl=impl)
                for m in convs}
    graphdef, params = nnx.split(nnx.Dict(encoders))

    def loss(p, x):
      model = nnx.merge(graphdef, p)
      return sum(jnp.sum(model[m](x[m]) ** 2) for m in convs)

    return jax.vmap(jax.grad(loss)), params   # every client its own kernels, as in the cohort

  fns, params = {}, None
  for impl in CONV_IMPLS:
    fns[impl], params = candidate(impl)
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (clients, *x.shape)), params)
  return fastest(case, fns, (stacked, inputs), path=path)
