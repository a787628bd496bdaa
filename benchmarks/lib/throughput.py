"""Client-steps per second of one ML-ECS local update, run several ways on the same work.

The entry point is `benchmarks/throughput.py` (flags, subprocess, output file); this module holds the
cohort of one cell (`Setup`), the variants, the timing and the Markdown report.

One client-step = one local optimizer step of one client on a batch of `batch` samples: the
client AMT *private stage* (`amt.stages(...).private`, run by `NodeProgram.run_stage`: LM +
lambda_ccl * GRAM CCL, shared + private LoRA, encoders and connector all trainable, clipped
AdamW), with the frozen backbone of the edge model. Every variant calls that same per-client
function on the same state, data and RNG keys, and every cohort variant is one setting of the
federation's own cohort execution, `ml_ecs.core.cohort_map.cohort_map`:

  loop          Python loop over clients, one jitted single-client call each (`steps` steps per call)
  vmap          cohort_map(update, chunk=0): one vmap over the stacked client axis
  vmap_chunk{k} cohort_map(update, chunk=k): lax.map over blocks of k vmapped clients
  sharded       cohort_map(update, mesh=mesh, placement='auto') under jit with NamedSharding(mesh,
                P('clients')) in/out shardings, frozen backbone replicated (XLA SPMD partitioner)
  sharded_shmap cohort_map(update, mesh=mesh, placement='shard_map') under the same jit
  flower        real Flower objects in-process: flwr Server.fit_round + FedAvg + NumPyClients over an
                in-process ClientProxy; each client's fit is the loop's jitted call
  limit         one shared set of trainables, all clients' samples in one batch (clients * batch), one
                optimizer update per step: the same forward/backward FLOPs without per-client separation
  ours@d, ours_vmap@d, drjax@d
                a whole cohort round on d devices (1: this process; >1: the sharded subprocess): broadcast
                of the global shared LoRA -> local update -> weighted mean of the uploaded shared LoRA.
                ours: cohort_map(placement='shard_map', chunk=--round_chunk) + mean.modality_mean; ours_vmap:
                the same with chunk 0; drjax: drjax.program / broadcast / map_fn / reduce_weighted_mean

The sharded variants need XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is
imported, so benchmarks/throughput.py runs them in a subprocess (`run_sharded_subprocess`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import default as default_config
from ml_ecs.core.context import RoundContext
from ml_ecs.algorithms.ml_ecs import amt
from ml_ecs.core import federation
from ml_ecs.core.client_store import broadcast_to_clients
from benchmarks.lib import fedavg
from ml_ecs.models import params
from ml_ecs.models.keys import KeyStream
from ml_ecs.data.cohort_data import SplitArrays
from ml_ecs.core.cohort_map import CLIENT_AXIS, cohort_map
from benchmarks.lib.xla_stats import COLLECTIVES, collectives_note, count_collectives, xla_flops  # noqa: F401
from ml_ecs.models.multimodal import MultimodalLM
from ml_ecs.core import autotune
from ml_ecs.core.node import NodeProgram, StageSpec, make_optimizer, sub

WORKLOADS = {'small': dict(batch=4, seq=16), 'large': dict(batch=8, seq=64)}
ALL_VARIANTS = ('loop', 'vmap', 'vmap_chunk', 'sharded', 'flower', 'limit', 'drjax')
ROUND_KINDS = ('ours', 'ours_vmap', 'drjax')   # 'drjax' in --variants expands to these, at each device count
DEFAULT_ROUND_DEVICES = (1, 4)
DEFAULT_ROUND_CHUNK = 8
DEFAULT_CLIENTS = (16, 64, 256, 1024)
DEFAULT_WORKLOADS = ('small', 'large')
DEFAULT_CHUNKS = (8, 16, 32, 64)


def log(msg: str) -> None:
  print(msg, flush=True)


# ---------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Setup:
  """One cell: C clients of one structure, their stacked state and data, and the local update."""
  workload: str
  clients: int
  batch: int
  seq: int
  steps: int
  program: NodeProgram
  spec: StageSpec
  frozen: nnx.State
  trainables: dict          # stacked [C, ...]
  opt_state: Any            # stacked [C, ...]
  data: SplitArrays         # stacked [C, N, ...]
  keys: jax.Array           # [C] typed keys
  text_lens: dict
  cache_key: tuple          # identifies the per-client shapes/program (loop executables are reused across C)

  def client_update(self, tr, opt, split, key, frozen):
    """The benchmarked local update of one client: `steps` optimizer steps of run_stage."""
    tr, opt, metrics = self.program.run_stage(tr, opt, split, key, RoundContext(frozen, None, None), self.spec)
    return tr, opt, metrics['loss']

  def cohort_update(self, *, chunk: int = 0, mesh=None, placement: str = 'shard_map'):
    """`client_update` of every stacked client: (tr, opt, split, keys, frozen) -> stacked outputs."""
    return cohort_map(self.client_update, 4, chunk=chunk, mesh=mesh, placement=placement)

  def select(self, idx) -> 'Setup':
    """The cohort of clients `idx` (repeats allowed) of this one, same program."""
    idx = np.asarray(idx)
    take = lambda t: jax.tree.map(lambda x: x[idx], t)
    return dataclasses.replace(self, clients=len(idx), trainables=take(self.trainables),
                               opt_state=take(self.opt_state), data=take(self.data), keys=self.keys[idx])


def text_lengths(seq: int, prompt_len: int) -> dict[str, int]:
  """instr_len/answer_len such that the backbone sees prompt + instr + answer[:-1] = seq tokens."""
  instr_len = (seq - prompt_len) // 2
  answer_len = seq - prompt_len - instr_len + 1
  if instr_len < 1 or answer_len < 2:
    raise ValueError(f'seq={seq} too short for prompt_len={prompt_len}')
  return dict(prompt_len=prompt_len, instr_len=instr_len, answer_len=answer_len,
              backbone_seq=prompt_len + instr_len + answer_len - 1)


@functools.lru_cache(maxsize=1)
def _dataset():
  from ml_ecs.data.embedded import load_default
  return load_default()


def make_setup(clients: int, workload: str, steps: int, *, width: int = 64, layers: int = 2, heads: int = 4,
               samples_per_client: int = 64, seed: int = 0, batch: int | None = None,
               seq: int | None = None, conv_impl: str = 'auto') -> Setup:
  """Builds the cohort of one cell: all modalities, fixed encoders (the first of each list in
  configs/default.py), the edge model with the given backbone size, synthetic text tokens, and
  per-client samples drawn from the embedded dataset. `conv_impl` as the main job's `train.conv_impl`
  ('auto': measured for this cohort, ml_ecs.core.autotune)."""
  wl = WORKLOADS.get(workload, {})
  batch = batch or wl['batch']
  seq = seq or wl['seq']
  cfg = default_config.get_config()
  cfg.train.lr_schedule = 'constant'   # a schedule's warm-up starts at lr 0: the timed step would not move
  ds = _dataset()
  modalities = ds.modality_names
  shapes = {m: x.shape[1:] for m, x in ds.modalities.items()}
  enc_types = {m: cfg.data.encoders[m][0] for m in modalities}
  lens = text_lengths(seq, cfg.edge_model.prompt_len)
  mcfg = default_config.model(default_config.backbone(width, layers, heads, max_len=seq + 1),
                              encoder_width=cfg.edge_model.encoder_width)
  vocab = cfg.text.vocab_size
  conv_impl = autotune.conv_impl(conv_impl, enc_types, shapes, mcfg.encoder_width, mcfg.d_enc, clients, batch,
                                 autotune.cache_path())[0]
  model_fn = lambda rngs: MultimodalLM(shapes, enc_types, modalities, mcfg, vocab, rngs=rngs, conv_impl=conv_impl)
  graphdef, _ = params.split_model(nnx.eval_shape(lambda: model_fn(KeyStream(0))))
  rng = np.random.default_rng(seed)
  instr = jnp.asarray(rng.integers(1, vocab, lens['instr_len']), jnp.int32)
  m = cfg.method
  program = NodeProgram(graphdef, len(modalities), instr, jnp.asarray(np.ones(instr.shape, np.float32)), m.ccl,
                        m.tau_ccl, m.tau_se_ccl, batch, make_optimizer(cfg.train))
  # The client private (AMT) stage of the default method, `steps` steps.
  spec = dataclasses.replace(amt.stages(m, cfg.train).private, steps=steps)

  # Initial values only: 'rbg' keys compile much faster on CPU than threefry for this many
  # initialisers. The update keys (batch sampling) are default threefry keys, as in the federation.
  frozen = jax.jit(lambda k: params.split_model(model_fn(KeyStream(k)))[1]['frozen'])(
      jax.random.key(seed, impl='rbg'))
  trainables = federation.stack_init(model_fn, jax.random.split(jax.random.key(seed + 1, impl='rbg'), clients))
  # Round-0 broadcast, as in the federation: every client starts from the same shared LoRA.
  trainables['shared'] = broadcast_to_clients(
      jax.tree.map(lambda x: x[0], trainables['shared']), trainables['shared'])
  opt_state = jax.jit(jax.vmap(lambda t: program.init_opt(t, spec)))(trainables)
  keys = jax.random.split(jax.random.key(seed + 2), clients)

  n = samples_per_client
  idx = rng.integers(0, ds.num_samples, (clients, n))
  data = SplitArrays(
      inputs={k: jnp.asarray(ds.modalities[k][idx]) for k in modalities},
      mod_mask=jnp.asarray(np.ones((clients, n, len(modalities)), np.float32)),
      count=jnp.asarray(np.full((clients,), n, np.int32)),
      answers=jnp.asarray(rng.integers(1, vocab, (clients, n, lens['answer_len'])).astype(np.int32)),
      answer_mask=jnp.asarray(np.ones((clients, n, lens['answer_len']), np.float32)),
      labels=jnp.asarray(ds.labels[idx]),
      ids=jnp.asarray(idx.astype(np.int32)))
  cache_key = (workload, batch, seq, steps, width, layers, heads, samples_per_client, seed)
  return Setup(workload, clients, batch, seq, steps, program, spec, frozen, trainables, opt_state, data, keys,
               lens, cache_key)


def nbytes(tree) -> int:
  return params.count(tree)[1]


def per_client_bytes(s: Setup) -> dict[str, int]:
  """Device bytes one client adds (trainables by part, optimizer state, private data) and the frozen
  backbone bytes (held once per cohort, not per client)."""
  one = lambda t: jax.tree.map(lambda x: x[0], t)
  out = {f'tr_{p}': nbytes(one(s.trainables[p])) for p in params.TRAINABLE}
  out['opt_state'] = nbytes(one(s.opt_state))
  out['data'] = nbytes(one(s.data))
  out['total'] = sum(out.values())
  out['frozen_backbone_once'] = nbytes(s.frozen)
  return out


def unstack(tree) -> list:
  """Per-client device copies of a stacked pytree: `params.unstack` on one host copy (one transfer
  per client instead of one device slice per leaf and client)."""
  return [jax.device_put(t) for t in params.unstack(jax.tree.map(np.asarray, tree))]


def _copy(tree):
  return jax.tree.map(lambda x: x.copy(), tree)


def _mem(compiled) -> dict[str, int]:
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  d = dict(arg=int(ma.argument_size_in_bytes), out=int(ma.output_size_in_bytes), alias=int(ma.alias_size_in_bytes),
           temp=int(ma.temp_size_in_bytes))
  # Upper bound of live bytes during the call; XLA's own peak_memory_in_bytes on CPU can be below the
  # arguments' size, so it is recorded but not used.
  d['xla_peak_field'] = int(getattr(ma, 'peak_memory_in_bytes', 0) or 0)
  d['peak'] = d['arg'] + d['out'] - d['alias'] + d['temp']
  return d


# ---------------------------------------------------------------------------- variants
_LOOP_CACHE: dict[tuple, Any] = {}


class Variant:
  """A way to run the local update of every client once. `call(state)` returns the next state
  (inputs are donated) without blocking; `trainables(state)` gives the stacked result."""
  name = ''

  def __init__(self, s: Setup):
    self.s = s
    self.mem: dict[str, int] = {}
    self.compile_s = 0.0
    self.notes: list[str] = []
    self.data, self.keys, self.frozen = s.data, s.keys, s.frozen

  def init(self):
    raise NotImplementedError

  def compile(self, state) -> None:
    """Default: lower and compile `self.fn(*state, data, keys, frozen)`."""
    t0 = time.perf_counter()
    self.compiled = self.fn.lower(*state, self.data, self.keys, self.frozen).compile()
    self.compile_s = time.perf_counter() - t0
    self.mem = _mem(self.compiled)

  def call(self, state):
    tr, opt, _ = self.compiled(*state, self.data, self.keys, self.frozen)
    return tr, opt

  def trainables(self, state) -> dict:
    return state[0]

  def held_bytes(self) -> int:
    """Peak device bytes of one call including everything held (XLA buffer assignment)."""
    return self.mem.get('peak', 0)

  def probe_s(self, state) -> float | None:
    """Projected seconds of one full call before running it (None = unknown)."""
    return None


class VmapVariant(Variant):
  """`cohort_map(update, chunk=k)` in one jit: one vmap (k = 0) or lax.map over k-client blocks."""
  name = 'vmap'

  def __init__(self, s: Setup, chunk: int = 0):
    super().__init__(s)
    if chunk:
      self.name = f'vmap_chunk{chunk}'
    self.fn = jax.jit(s.cohort_update(chunk=chunk), donate_argnums=(0, 1))

  def init(self):
    return _copy(self.s.trainables), _copy(self.s.opt_state)


class LoopVariant(Variant):
  name = 'loop'

  def __init__(self, s: Setup):
    super().__init__(s)
    self.fn = jax.jit(s.client_update, donate_argnums=(0, 1))
    self.splits = unstack(s.data)
    self.keys = list(s.keys)

  def init(self):
    return unstack(self.s.trainables), unstack(self.s.opt_state)

  def compile(self, state):
    t0 = time.perf_counter()
    key = self.s.cache_key
    if key not in _LOOP_CACHE:
      _LOOP_CACHE[key] = self.fn.lower(state[0][0], state[1][0], self.splits[0], self.keys[0],
                                       self.s.frozen).compile()
    else:
      self.notes.append('executable reused from a smaller cell')
    self.compiled = _LOOP_CACHE[key]
    self.compile_s = time.perf_counter() - t0
    one = _mem(self.compiled)
    # Everything held across the loop (all clients' state + data + frozen) plus one call's temporaries.
    held = sum(nbytes(t) for t in state[0]) + sum(nbytes(t) for t in state[1]) + nbytes(self.s.data) + \
        nbytes(self.s.frozen)
    self.mem = dict(one, peak=held + one.get('temp', 0) + one.get('out', 0) - one.get('alias', 0))

  def call(self, state, clients: int | None = None):
    trs, opts = list(state[0]), list(state[1])
    for c in range(self.s.clients if clients is None else clients):
      trs[c], opts[c], _ = self.compiled(trs[c], opts[c], self.splits[c], self.keys[c], self.s.frozen)
    return trs, opts

  def trainables(self, state):
    return params.stack(state[0])

  def probe_s(self, state):
    """Times a pass over the first few clients (twice: warm, then timed) and scales to all clients."""
    k = min(self.s.clients, 8)
    out = self.call(state, k)
    jax.block_until_ready(out)
    state[0][:k], state[1][:k] = out[0][:k], out[1][:k]
    t0 = time.perf_counter()
    out = self.call(state, k)
    jax.block_until_ready(out)
    state[0][:k], state[1][:k] = out[0][:k], out[1][:k]
    return (time.perf_counter() - t0) * self.s.clients / k


class LimitVariant(Variant):
  """One shared set of trainables; every step runs the model once on one batch of all C*batch samples
  (each client's `batch` rows drawn from its own data with its own key, as in the other variants) and
  makes one optimizer update.

  The loss is the stage's own `NodeProgram.losses` and `total`, vmapped over the C groups of `batch`
  rows with the trainables and frozen backbone broadcast: one weight set, so XLA runs the group axis as
  part of the batch (one [C*b, ...] forward/backward), while the in-batch GRAM CCL (b x b) stays within
  each client's rows, so FLOPs match the per-client variants (a CCL over all C*b rows would cost
  (C*b)^2). The objective is the mean over groups, which is the mean over the whole batch for the LM
  term (every group has the same number of answer tokens here). With C=1 it is exactly the per-client
  update. Steps run in lax.scan, as in run_stage, so the program structure matches the per-client
  variants."""
  name = 'limit'

  def __init__(self, s: Setup):
    super().__init__(s)
    prog, spec = s.program, s.spec
    if spec.lambda_se_ccl or spec.fedprox_mu or prog.batch_view is not None:
      raise ValueError('limit variant: only a stage without SE-CCL, FedProx and modality dropout')

    def update(tr, opt, split, keys, frozen):
      fixed = {p: tr[p] for p in tr if p not in spec.parts}
      step_keys = jax.vmap(lambda k: jax.random.split(k, spec.steps))(keys)     # [C, S], as run_stage

      def step(carry, ks):
        trained, opt = carry
        k_batch = jax.vmap(lambda k: jax.random.split(k)[0])(ks)
        groups = jax.vmap(prog.sample_batch)(split, k_batch)                  # [C, b, ...]

        def loss_fn(trained):
          group_losses = lambda batch: prog.losses({**trained, **fixed}, frozen, batch, spec, {})
          terms = jax.tree.map(jnp.mean, jax.vmap(group_losses)(groups))
          return prog.total(terms, spec)

        loss, grads = jax.value_and_grad(loss_fn)(trained)
        updates, opt = prog.optimizer.update(grads, opt, trained)
        return (optax.apply_updates(trained, updates), opt), loss

      (tr2, opt), losses = jax.lax.scan(step, (sub(tr, spec.parts), opt), jnp.swapaxes(step_keys, 0, 1))
      return {**tr, **tr2}, opt, losses.mean()

    self.fn = jax.jit(update, donate_argnums=(0, 1))

  def init(self):
    one = lambda t: jax.tree.map(lambda x: x[0].copy(), t)
    return one(self.s.trainables), one(self.s.opt_state)

  def trainables(self, state):
    return jax.tree.map(lambda x: x[None], state[0])


class ShardedVariant(Variant):
  """The client axis of state, data and keys sharded over a 1-D mesh ('clients'), the frozen backbone
  replicated, under jit with those in/out NamedShardings.

  'sharded': `cohort_map(..., placement='auto')`, XLA's SPMD partitioner splits the vmapped program.
  'sharded_shmap': `cohort_map(..., placement='shard_map')`, so each device runs the vmapped update on
  its own clients with no partitioner decisions (and no collectives)."""
  name = 'sharded'

  def __init__(self, s: Setup, devices: int, shmap: bool = False):
    super().__init__(s)
    if jax.device_count() < devices:
      raise RuntimeError(f'{devices} devices needed, have {jax.device_count()}')
    if s.clients % devices:
      raise ValueError(f'{s.clients} clients do not split over {devices} devices')
    self.devices = devices
    if shmap:
      self.name = 'sharded_shmap'
    mesh = federation.client_mesh(devices)
    self.shard, self.repl = NamedSharding(mesh, P(CLIENT_AXIS)), NamedSharding(mesh, P())
    cohort = s.cohort_update(mesh=mesh, placement='shard_map' if shmap else 'auto')
    self.fn = jax.jit(cohort, in_shardings=(self.shard,) * 4 + (self.repl,),
                      out_shardings=(self.shard, self.shard, self.shard), donate_argnums=(0, 1))
    self.data, self.keys = jax.device_put((s.data, s.keys), self.shard)
    self.frozen = jax.device_put(s.frozen, self.repl)
    self.notes.append(f'{devices} forced CPU devices')

  def held_bytes(self) -> int:
    return self.mem.get('peak', 0) * self.devices   # memory_analysis is per device

  def init(self):
    return jax.device_put((_copy(self.s.trainables), _copy(self.s.opt_state)), self.shard)

  def compile(self, state):
    super().compile(state)
    self.notes.append(collectives_note(self.compiled))


def round_variant_name(kind: str, devices: int) -> str:
  return f'{kind}@{devices}'


class RoundVariant(Variant):
  """A whole cohort round on a 1-D 'clients' mesh of `devices` devices: broadcast the global shared
  LoRA to every client -> `steps` local steps -> weighted mean (by sample count) of the uploaded shared
  LoRA. State, data, keys and weights sharded P('clients'), global shared LoRA and frozen backbone
  replicated, under one jit with those in/out shardings.

  kind 'ours' / 'ours_vmap': the federation's execution, `cohort_map(placement='shard_map', chunk=k)`
  (k = `chunk`, resp. 0) and the MMA reduction `ml_ecs.aggregation.mean.modality_mean` (samples weighting).
  kind 'drjax': the same per-client update and weighted mean written with DrJAX primitives:
  `drjax.program(placements={'clients': C})`, `drjax.broadcast` of the global shared LoRA,
  `drjax.map_fn` of the update (vmap with spmd_axis_name='clients' + sharding constraints: XLA's SPMD
  partitioner places it) and `drjax.reduce_weighted_mean`."""

  def __init__(self, s: Setup, kind: str, devices: int, chunk: int = DEFAULT_ROUND_CHUNK):
    super().__init__(s)
    if kind not in ROUND_KINDS:
      raise ValueError(f'round kind must be one of {ROUND_KINDS}, got {kind!r}')
    if jax.device_count() < devices:
      raise RuntimeError(f'{devices} devices needed, have {jax.device_count()}')
    if s.clients % devices:
      raise ValueError(f'{s.clients} clients do not split over {devices} devices')
    self.name, self.devices = round_variant_name(kind, devices), devices
    mesh = federation.client_mesh(devices)
    per_device = s.clients // devices
    k = chunk if kind == 'ours' and chunk < per_device else 0
    fn = drjax_round(s, mesh) if kind == 'drjax' else ours_round(s, mesh, k)
    shard, repl = NamedSharding(mesh, P(CLIENT_AXIS)), NamedSharding(mesh, P())
    self.fn = jax.jit(fn, in_shardings=(repl, shard, shard, shard, shard, shard, repl),
                      out_shardings=(shard, shard, shard, repl), donate_argnums=(1, 2))
    self.shard, self.mesh = shard, mesh
    self.data, self.keys = jax.device_put((s.data, s.keys), shard)
    self.weights = jax.device_put(s.data.count.astype(jnp.float32), shard)
    self.frozen = jax.device_put(s.frozen, repl)
    self.global_shared = jax.device_put(jax.tree.map(lambda x: x[0], s.trainables['shared']), repl)
    self.notes.append(f'{devices} {jax.devices()[0].platform.upper()} device{"s" if devices > 1 else ""}'
                      + (f', chunk {k}' if k else ''))

  def _args(self, state):
    return (self.global_shared, *state, self.data, self.keys, self.weights, self.frozen)

  def init(self):
    return jax.device_put((_copy(self.s.trainables), _copy(self.s.opt_state)), self.shard)

  def compile(self, state):
    t0 = time.perf_counter()
    with jax.set_mesh(self.mesh):
      self.compiled = self.fn.lower(*self._args(state)).compile()
    self.compile_s = time.perf_counter() - t0
    self.mem = _mem(self.compiled)
    self.collectives = count_collectives(self.compiled)
    self.flops = xla_flops(self.compiled)
    self.notes.append(collectives_note(self.compiled))

  def call(self, state):
    tr, opt, _, self.global_shared = self.compiled(*self._args(state))
    return tr, opt

  def held_bytes(self) -> int:
    return self.mem.get('peak', 0) * self.devices   # memory_analysis is per device


def ours_round(s: Setup, mesh, chunk: int):
  """(global_shared, tr, opt, data, keys, weights, frozen) -> (tr, opt, loss, new global) with
  cohort_map (shard_map, `chunk`) and mean.modality_mean."""
  update = s.cohort_update(chunk=chunk, mesh=mesh, placement='shard_map')

  def round_fn(global_shared, tr, opt, data, keys, weights, frozen):
    tr = {**tr, 'shared': broadcast_to_clients(global_shared, tr['shared'])}
    tr, opt, loss = update(tr, opt, data, keys, frozen)
    new_global, _ = fedavg.weighted_mean(tr['shared'], weights, global_shared)
    return tr, opt, loss, new_global
  return round_fn


def drjax_round(s: Setup, mesh):
  """The same round written with DrJAX 0.2.1 primitives; trace it under `jax.set_mesh(mesh)` (DrJAX
  reads the mesh from the context, for every primitive including the reduction's own map)."""
  import drjax

  @drjax.program(placements={CLIENT_AXIS: s.clients})
  def round_fn(global_shared, tr, opt, data, keys, weights, frozen):
    tr = {**tr, 'shared': drjax.broadcast(global_shared)}
    tr, opt, loss = drjax.map_fn(lambda t, o, d, k: s.client_update(t, o, d, k, frozen), (tr, opt, data, keys))
    new_global = drjax.reduce_weighted_mean(tr['shared'], jax.tree.map(lambda _: weights, tr['shared']))
    return tr, opt, loss, new_global
  return round_fn


class FlowerVariant(Variant):
  """Flower FedAvg, in-process: one round = flwr.server.Server.fit_round (strategy.configure_fit ->
  flwr's fit_clients thread pool -> FedAvg.aggregate_fit), each client a flwr NumPyClient (wrapped by
  NumPyClient.to_client(), so parameters go through flwr's ndarrays<->Parameters serialisation)
  behind a minimal in-process ClientProxy (what Flower's Ray simulation does per actor, without Ray).
  The global parameters are the shared LoRA (what ML-ECS communicates); private LoRA, encoders,
  connector and optimizer state stay on the client. A client's fit runs the loop's jitted call."""
  name = 'flower'

  def __init__(self, s: Setup, workers: int = 0):
    super().__init__(s)
    import flwr  # noqa: F401  (ImportError -> skipped by the caller)
    self.loop = LoopVariant(s)
    self.workers = workers or None

  def init(self):
    return self.loop.init()

  def compile(self, state):
    self.loop.compile(state)
    self.compiled, self.compile_s, self.mem = self.loop.compiled, self.loop.compile_s, self.loop.mem
    self._build(state)

  def _build(self, state):
    from flwr.client import NumPyClient
    from flwr.common import DisconnectRes, ndarrays_to_parameters
    from flwr.server import Server, SimpleClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedAvg
    logging.getLogger('flwr').setLevel(logging.ERROR)
    s, compiled = self.s, self.compiled
    treedef = jax.tree.structure(state[0][0]['shared'])
    num_examples = s.steps * s.batch

    class BenchClient(NumPyClient):
      def __init__(self, tr, opt, split, key):
        self.tr, self.opt, self.split, self.key = tr, opt, split, key

      def get_parameters(self, config):
        return [np.asarray(x) for x in jax.tree.leaves(self.tr['shared'])]

      def fit(self, parameters, config):
        shared = jax.tree.unflatten(treedef, [jnp.asarray(p) for p in parameters])
        self.tr, self.opt, loss = compiled({**self.tr, 'shared': shared}, self.opt, self.split, self.key, s.frozen)
        return self.get_parameters(config), num_examples, {'loss': float(loss)}

    class InProcessProxy(ClientProxy):
      def __init__(self, cid, client):
        super().__init__(cid)
        self.client = client

      def get_properties(self, ins, timeout, group_id):
        return self.client.get_properties(ins)

      def get_parameters(self, ins, timeout, group_id):
        return self.client.get_parameters(ins)

      def fit(self, ins, timeout, group_id):
        return self.client.fit(ins)

      def evaluate(self, ins, timeout, group_id):
        return self.client.evaluate(ins)

      def reconnect(self, ins, timeout, group_id):
        return DisconnectRes(reason='')

    self.clients = [BenchClient(state[0][c], state[1][c], self.loop.splits[c], self.loop.keys[c])
                    for c in range(s.clients)]
    mean_loss = lambda ms: {'loss': float(sum(n * m['loss'] for n, m in ms) / max(sum(n for n, _ in ms), 1))}
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=s.clients,
                      min_available_clients=s.clients, fit_metrics_aggregation_fn=mean_loss,
                      initial_parameters=ndarrays_to_parameters(self.clients[0].get_parameters({})))
    manager = SimpleClientManager()
    for c, cl in enumerate(self.clients):
      manager.register(InProcessProxy(str(c), cl.to_client()))
    self.server = Server(client_manager=manager, strategy=strategy)
    self.server.set_max_workers(self.workers)
    self.server.parameters = strategy.initialize_parameters(manager)
    self.round = 0
    import flwr
    self.notes.append(f'flwr {flwr.__version__}, in-process ClientProxy, '
                      f'{self.workers or "default"} fit threads')

  def call(self, state):
    """One Flower round; returns after every client's result was serialised to numpy and aggregated.
    The client state lives in the NumPyClients (the `state` handed to compile was donated to them)."""
    self.round += 1
    params_new, metrics, (results, failures) = self.server.fit_round(server_round=self.round, timeout=None)
    if failures:
      raise RuntimeError(f'flower round failed: {failures[0]!r}')
    self.server.parameters = params_new
    return ()

  def trainables(self, state):
    return params.stack([c.tr for c in self.clients])

  def probe_s(self, state):
    return None


def variant_names(names, chunks, clients: int, round_devices=DEFAULT_ROUND_DEVICES) -> list[str]:
  """Expands 'vmap_chunk' into vmap_chunk{k} for every k < clients, 'sharded' into sharded and
  sharded_shmap, and 'drjax' into {ours, ours_vmap, drjax}@d for every d in `round_devices`."""
  out = []
  for n in names:
    if '@' in n:   # one round variant by name, e.g. 'ours@1'
      out.append(n)
      continue
    if n not in ALL_VARIANTS:
      raise ValueError(f'unknown variant {n!r}; expected one of {ALL_VARIANTS}')
    if n == 'vmap_chunk':
      out += [f'vmap_chunk{k}' for k in chunks if k < clients]
    elif n == 'sharded':
      out += ['sharded', 'sharded_shmap']
    elif n == 'drjax':
      out += [round_variant_name(k, d) for d in round_devices for k in ROUND_KINDS if clients % d == 0]
    else:
      out.append(n)
  return out


def make_variant(s: Setup, name: str, devices: int = 4, flower_workers: int = 0,
                 round_chunk: int = DEFAULT_ROUND_CHUNK) -> Variant:
  if '@' in name:
    kind, d = name.split('@')
    return RoundVariant(s, kind, int(d), round_chunk)
  if name == 'loop':
    return LoopVariant(s)
  if name == 'vmap':
    return VmapVariant(s)
  if name.startswith('vmap_chunk'):
    return VmapVariant(s, chunk=int(name[len('vmap_chunk'):]))
  if name == 'limit':
    return LimitVariant(s)
  if name in ('sharded', 'sharded_shmap'):
    return ShardedVariant(s, devices, shmap=name == 'sharded_shmap')
  if name == 'flower':
    return FlowerVariant(s, flower_workers)
  raise ValueError(f'unknown variant {name!r}; expected one of {ALL_VARIANTS}')


# ---------------------------------------------------------------------------- timing
def rss_bytes() -> int:
  try:
    import psutil
    return int(psutil.Process().memory_info().rss)
  except ImportError:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def time_variant(v: Variant, repeats: int, budget_s: float, max_mem: float, projected_s: float | None = None,
                 projected_peak: float | None = None, deadline: float | None = None) -> dict[str, Any]:
  """Compiles, warms up and times `v`; returns a result row (with 'skip' set when skipped).

  Skips before compiling when the projection from the previous client count says one call would not fit
  the cell budget (warm-up + 1 timed call) or the memory limit; after compiling, when XLA's buffer
  assignment exceeds the memory limit or (loop) a timed probe of the first clients exceeds the budget.
  Calls under 0.1 s are repeated more (up to 10) for a steadier median."""
  s = v.s
  row: dict[str, Any] = dict(workload=s.workload, clients=s.clients, variant=v.name, steps=s.steps,
                             batch=s.batch, seq=s.seq)

  def too_slow(proj, how):
    if proj is None:
      return False
    if 2 * proj > budget_s:
      row.update(projected_call_s=proj, skip=f'projected {proj:.1f} s per call ({how}): warm-up + 1 timed call '
                 f'> --cell_budget_s={budget_s:g}')
      return True
    if deadline is not None and time.time() + 2 * proj > deadline:
      row.update(projected_call_s=proj, skip=f'projected {proj:.1f} s per call ({how}) overruns --total_budget_s')
      return True
    return False

  if deadline is not None and time.time() > deadline:
    row['skip'] = '--total_budget_s spent'
    return row
  if too_slow(projected_s, 'linear in clients from the previous client count'):
    return row
  if projected_peak is not None and projected_peak > max_mem:
    row['skip'] = (f'projected peak memory {projected_peak / 2**30:.1f} GiB (linear from the previous client count) '
                   f'> --max_mem_gb={max_mem / 2**30:g}')
    return row
  state = v.init()
  v.compile(state)
  row.update(compile_s=v.compile_s, mem=v.mem, peak_bytes=v.held_bytes(), flops=getattr(v, 'flops', None))
  if v.held_bytes() > max_mem:
    row['skip'] = f'compiled peak memory {v.held_bytes() / 2**30:.1f} GiB > --max_mem_gb={max_mem / 2**30:g}'
    return row
  if too_slow(v.probe_s(state), 'timed pass over the first 8 clients, scaled'):
    return row
  t0 = time.perf_counter()
  state = v.call(state)
  jax.block_until_ready(state)
  warm = time.perf_counter() - t0
  n = repeats if warm >= 0.1 else max(repeats, min(10, int(1.0 / max(warm, 1e-3))))
  n = int(max(1, min(n, (budget_s - warm) // max(warm, 1e-9))))
  if n < repeats:
    v.notes.append(f'{n}/{repeats} repeats (budget)')
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    state = v.call(state)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  row.update(warm_s=warm, times=times, median_s=med, client_steps_per_s=s.clients * s.steps / med,
             rss_bytes=rss_bytes(), notes='; '.join(v.notes))
  return row


def run_cells(clients: list[int], workloads: list[str], variants: list[str], *, steps: int, repeats: int,
              width: int, layers: int, heads: int, chunks: list[int], budget_s: float, max_mem: float,
              samples: int, seed: int, devices: int = 4, flower_workers: int = 0, deadline: float | None = None,
              round_devices=DEFAULT_ROUND_DEVICES, round_chunk: int = DEFAULT_ROUND_CHUNK,
              on_row: Callable[[dict], None] = lambda r: None) -> tuple[list[dict], dict]:
  """Every (workload, clients, variant) cell, in increasing client count. Returns (rows, memory info).
  `round_devices`: the device counts at which 'drjax' runs its round variants (this process's devices)."""
  rows: list[dict] = []
  mem_info: dict[str, dict] = {}
  for wl in workloads:
    last: dict[str, dict] = {}       # variant -> last timed row (time projection)
    last_mem: dict[str, dict] = {}   # variant -> last compiled row (memory projection)
    for c in sorted(clients):
      names = variant_names(variants, chunks, c, round_devices)
      if 'flower' in names:
        try:
          import flwr  # noqa: F401
        except ImportError as e:
          names.remove('flower')
          row = dict(workload=wl, clients=c, variant='flower',
                     skip=f'flwr not installed ({e}); pip install -e ".[bench]"')
          rows.append(row)
          on_row(row)
      if not names:
        continue
      s = make_setup(c, wl, steps, width=width, layers=layers, heads=heads, samples_per_client=samples, seed=seed)
      mem_info.setdefault(wl, dict(per_client=per_client_bytes(s), text=s.text_lens))
      for name in names:
        prev, prev_mem = last.get(name), last_mem.get(name)
        proj = prev['median_s'] * c / prev['clients'] if prev else None
        if name == 'flower' and 'loop' in last and last['loop']['clients'] == c:
          proj = max(proj or 0.0, last['loop']['median_s'])  # a Flower round does at least the loop's work
        peak = prev_mem['peak_bytes'] * c / prev_mem['clients'] if prev_mem else None
        try:
          row = time_variant(make_variant(s, name, devices, flower_workers, round_chunk), repeats, budget_s,
                             max_mem, proj, peak, deadline)
        except Exception as e:  # keep the grid going; the reason lands in the table
          traceback.print_exc()
          row = dict(workload=wl, clients=c, variant=name, skip=f'error: {type(e).__name__}: {e}'[:300])
        rows.append(row)
        on_row(row)
        if 'median_s' in row:
          last[name] = row
        if row.get('peak_bytes'):
          last_mem[name] = row
      del s
  return rows, mem_info


# ---------------------------------------------------------------------------- reporting
def fmt_row(r: dict) -> str:
  if 'skip' in r:
    return f"{r['workload']:>5} {r['clients']:>5} {r['variant']:<13} SKIP: {r['skip']}"
  return (f"{r['workload']:>5} {r['clients']:>5} {r['variant']:<13} {r['client_steps_per_s']:>12,.0f} client-steps/s"
          f"  median {r['median_s']:.3f}s  compile {r['compile_s']:.1f}s  peak {r['peak_bytes'] / 2**20:,.0f} MiB"
          + (f"  [{r['notes']}]" if r.get('notes') else ''))


def _ratio(a, b) -> str:
  return f'{a / b:.2f}x' if a and b else 'n/a'


def _cells(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
  """{(workload, clients): {variant: row}}."""
  cells: dict[tuple, dict[str, dict]] = {}
  for r in rows:
    cells.setdefault((r['workload'], r['clients']), {})[r['variant']] = r
  return cells


def ratio_rows(rows: list[dict]) -> list[dict]:
  out = []
  for (wl, c), vs in _cells(rows).items():
    thr = {k: v.get('client_steps_per_s') for k, v in vs.items()}
    chunk = {k: t for k, t in thr.items() if k.startswith('vmap_chunk') and t}
    best = max(chunk, key=chunk.get) if chunk else None
    out.append(dict(workload=wl, clients=c, best_chunk=best[len('vmap_chunk'):] if best else 'n/a',
                    vmap_loop=_ratio(thr.get('vmap'), thr.get('loop')),
                    chunk_loop=_ratio(chunk.get(best), thr.get('loop')),
                    chunk_vmap=_ratio(chunk.get(best), thr.get('vmap')),
                    vmap_limit=_ratio(thr.get('vmap'), thr.get('limit')),
                    sharded_vmap=_ratio(thr.get('sharded'), thr.get('vmap')),
                    shmap_vmap=_ratio(thr.get('sharded_shmap'), thr.get('vmap')),
                    vmap_flower=_ratio(thr.get('vmap'), thr.get('flower'))))
  return out


def headline_rows(rows: list[dict]) -> list[dict]:
  """Per cell, the ratios a user cares about: our round over DrJAX's (same devices, throughput and compiled
  peak memory), and our 1-device round over the loop, the limit and the in-process Flower round."""
  out = []
  for (wl, c), vs in _cells(rows).items():
    thr = {k: v.get('client_steps_per_s') for k, v in vs.items()}
    peak = {k: v.get('peak_bytes') for k, v in vs.items()}
    devices = sorted({int(k.split('@')[1]) for k in vs if '@' in k})
    if not devices:
      continue
    d = dict(workload=wl, clients=c)
    for n in devices:
      ours, vm, dr = (round_variant_name(k, n) for k in ROUND_KINDS)
      d[f'ours_drjax@{n}'] = _ratio(thr.get(ours), thr.get(dr))
      d[f'oursvmap_drjax@{n}'] = _ratio(thr.get(vm), thr.get(dr))
      d[f'mem_ours_drjax@{n}'] = _ratio(peak.get(ours), peak.get(dr))
      d[f'coll_drjax@{n}'] = (vs.get(dr, {}).get('notes', '').split('collectives in HLO: ')[-1]
                              if 'collectives' in vs.get(dr, {}).get('notes', '') else 'n/a')
    one = round_variant_name('ours', 1)
    d.update(ours_loop=_ratio(thr.get(one), thr.get('loop')), ours_limit=_ratio(thr.get(one), thr.get('limit')),
             ours_flower=_ratio(thr.get(one), thr.get('flower')), devices=devices)
    out.append(d)
  return out


def headline_markdown(rows: list[dict]) -> list[str]:
  hs = headline_rows(rows)
  if not hs:
    return []
  devices = sorted({n for h in hs for n in h['devices']})
  L = ['## Headline ratios (throughput of the first over the second; same run, same machine)', '',
       '`ours@d` = one cohort round (broadcast -> local update -> weighted mean of the shared LoRA) with '
       '`cohort_map(placement="shard_map", chunk=k)` + `ml_ecs.aggregation.mean.modality_mean` on d CPU devices; `drjax@d` = the same '
       'round with DrJAX primitives; loop / limit / flower time the local update only (no aggregation), so '
       'ours/loop slightly understates ours. Flower is in-process flwr objects, not a Flower deployment.', '',
       '| workload | clients | ' + ' | '.join(f'ours/drjax @{n} | ours_vmap/drjax @{n} | peak mem ours/drjax @{n} | '
                                              f'drjax collectives @{n}' for n in devices)
       + ' | ours@1/loop | ours@1/limit | ours@1/flower (in-process) |',
       '|---|---:|' + '---:|---:|---:|---|' * len(devices) + '---:|---:|---:|']
  for h in hs:
    cols = [f"{h.get(f'ours_drjax@{n}', 'n/a')} | {h.get(f'oursvmap_drjax@{n}', 'n/a')} | "
            f"{h.get(f'mem_ours_drjax@{n}', 'n/a')} | {h.get(f'coll_drjax@{n}', 'n/a')}" for n in devices]
    L.append(f"| {h['workload']} | {h['clients']} | " + ' | '.join(cols) +
             f" | {h['ours_loop']} | {h['ours_limit']} | {h['ours_flower']} |")
  return L + ['']


def memory_slopes(rows: list[dict]) -> list[dict]:
  """Peak bytes per added client between consecutive measured client counts, per variant."""
  by: dict[tuple, list] = {}
  for r in rows:
    if r.get('peak_bytes'):
      by.setdefault((r['workload'], r['variant']), []).append(r)
  out = []
  for (wl, v), rs in by.items():
    rs = sorted(rs, key=lambda r: r['clients'])
    for a, b in zip(rs, rs[1:]):
      d = dict(workload=wl, variant=v, clients=f"{a['clients']}->{b['clients']}",
               peak_per_client=(b['peak_bytes'] - a['peak_bytes']) / (b['clients'] - a['clients']))
      if a.get('rss_bytes') and b.get('rss_bytes'):
        d['rss_per_client'] = (b['rss_bytes'] - a['rss_bytes']) / (b['clients'] - a['clients'])
      out.append(d)
  return out


def machine_info() -> dict[str, str]:
  cpu = 'unknown'
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), cpu)
  except OSError:
    pass
  info = dict(nproc=str(os.cpu_count()), cpu=cpu, python=platform.python_version(), jax=jax.__version__,
              backend=jax.default_backend(), devices=str(jax.devices()))
  try:
    import flax
    info['flax'] = flax.__version__
  except ImportError:
    pass
  try:
    import flwr
    info['flwr'] = flwr.__version__
  except ImportError:
    info['flwr'] = 'not installed'
  info.update(loadavg('loadavg_at_start'))
  try:
    info['nproc_cmd'] = subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()
  except OSError:
    pass
  return info


def loadavg(key: str) -> dict[str, str]:
  """{key: '1-min 5-min 15-min load averages'}, or {} where the OS has none."""
  try:
    return {key: ' '.join(f'{x:.2f}' for x in os.getloadavg())}
  except OSError:
    return {}


def write_json(path: str, obj) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, default=str, indent=1)


def _mib(b) -> str:
  return f'{b / 2**20:,.1f}' if b else 'n/a'


def markdown(rows, mem_info, info, command, settings, elapsed_s) -> str:
  L = ['# ML-ECS local-update throughput', '',
       'Written by `benchmarks/throughput.py` (see `benchmarks/README.md` for what each variant runs).', '']
  if list(settings.get('clients', ())) != list(DEFAULT_CLIENTS) or \
      tuple(settings.get('workloads', {})) != DEFAULT_WORKLOADS:
    L += ['**Partial grid** (not the default clients x workloads): a smoke run, not the reference numbers.', '']
  L += headline_markdown(rows)
  L += [
       '## Command', '', '```', command, '```', '',
       *([f'Wall time of the run: {elapsed_s / 60:.1f} min.', ''] if elapsed_s else []), '## Machine', '']
  L += [f'- {k}: `{v}`' for k, v in info.items()]
  L += ['', '## Settings', '']
  L += [f'- {k}: {v}' for k, v in settings.items()]
  L += ['', '## Throughput (client-steps per second; one client-step = one optimizer step of one client on '
        '`batch` samples)', '',
        '| workload | clients | variant | client-steps/s | median s/call | compile s | peak MiB (XLA) | notes |',
        '|---|---:|---|---:|---:|---:|---:|---|']
  for r in rows:
    if 'skip' in r:
      L.append(f"| {r['workload']} | {r['clients']} | {r['variant']} | skipped | | | | {r['skip']} |")
    else:
      L.append(f"| {r['workload']} | {r['clients']} | {r['variant']} | {r['client_steps_per_s']:,.0f} | "
               f"{r['median_s']:.3f} | {r['compile_s']:.1f} | {_mib(r['peak_bytes'])} | {r.get('notes', '')} |")
  L += ['', '## Ratios (throughput of the first over the second)', '',
        '| workload | clients | vmap/loop | best chunk k | best-chunk/loop | best-chunk/vmap | vmap/limit | '
        'sharded/vmap | sharded_shmap/vmap | vmap/flower |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in ratio_rows(rows):
    L.append(f"| {r['workload']} | {r['clients']} | {r['vmap_loop']} | {r['best_chunk']} | {r['chunk_loop']} | "
             f"{r['chunk_vmap']} | {r['vmap_limit']} | {r['sharded_vmap']} | {r['shmap_vmap']} | {r['vmap_flower']} |")
  L += ['', '## Memory', '', 'Device bytes one client adds (stacked leading-axis slice of each array) and the '
        'frozen backbone, held once per cohort (broadcast with `in_axes=None`, replicated when sharded):', '',
        '| workload | shared LoRA | private LoRA+gates | encoders | connector | optimizer state | data | '
        'total per client | frozen backbone (once) |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for wl, m in mem_info.items():
    p = m['per_client']
    L.append(f"| {wl} | {p['tr_shared']:,} | {p['tr_private']:,} | {p['tr_encoders']:,} | {p['tr_connector']:,} | "
             f"{p['opt_state']:,} | {p['data']:,} | {p['total']:,} | {p['frozen_backbone_once']:,} |")
  checks = [r for r in rows if r['variant'] == 'vmap' and r.get('mem')]
  if checks:
    L += ['', 'Arguments of the compiled vmap call vs. clients x per-client bytes + frozen backbone '
          '(+ keys, 8 B/client): the backbone is an argument once, not per client. (jit prunes arguments the '
          'objective never reads, here the per-sample labels and ids, so XLA\'s figure is slightly lower.)', '',
          '| workload | clients | XLA argument bytes | C x per-client + frozen + keys |', '|---|---:|---:|---:|']
    for r in checks:
      p = mem_info[r['workload']]['per_client']
      L.append(f"| {r['workload']} | {r['clients']} | {r['mem']['arg']:,} | "
               f"{r['clients'] * (p['total'] + 8) + p['frozen_backbone_once']:,} |")
  sl = memory_slopes(rows)
  if sl:
    L += ['', 'Peak memory per added client, between consecutive client counts. "XLA" = compiled buffer '
          'assignment (`memory_analysis()`: arguments + outputs - aliased + temporaries; for loop/flower all '
          'clients\' held state + one call\'s temporaries); "RSS" = process resident-set delta after the '
          'timed calls (allocator caching makes it noisy and it can be negative). `memory_stats()` is None '
          'on the CPU backend.', '',
          '| workload | variant | clients | XLA peak KiB / added client | RSS KiB / added client |',
          '|---|---|---|---:|---:|']
    for d in sl:
      rss = f"{d['rss_per_client'] / 1024:,.1f}" if 'rss_per_client' in d else 'n/a'
      L.append(f"| {d['workload']} | {d['variant']} | {d['clients']} | {d['peak_per_client'] / 1024:,.1f} | {rss} |")
  L += ['', '## Reading', '', *reading(rows), '']
  return '\n'.join(L)


def reading(rows) -> list[str]:
  """Sentences generated from the numbers, plus the caveats that hold for every run."""
  out = []
  for r in ratio_rows(rows):
    bits = []
    if r['vmap_loop'] != 'n/a':
      bits.append(f"vmap/loop {r['vmap_loop']}" + (' (vmap LOSES to the loop)' if float(r['vmap_loop'][:-1]) < 1
                                                    else ''))
    if r['chunk_loop'] != 'n/a':
      bits.append(f"best chunk k={r['best_chunk']}: {r['chunk_loop']} the loop, {r['chunk_vmap']} vmap")
    if r['vmap_limit'] != 'n/a':
      bits.append(f"vmap/limit {r['vmap_limit']}")
    if r['sharded_vmap'] != 'n/a' or r['shmap_vmap'] != 'n/a':
      bits.append(f"sharded/vmap {r['sharded_vmap']} (jit shardings), {r['shmap_vmap']} (shard_map)")
    if r['vmap_flower'] != 'n/a':
      bits.append(f"vmap/flower {r['vmap_flower']}")
    if bits:
      out.append(f"- {r['workload']}, {r['clients']} clients: " + '; '.join(bits) + '.')
  out += ['',
          '- vmap/limit near (or above) 1 means the per-client separation (own LoRA, encoders, connector and '
          'Adam state per client) costs little next to the model FLOPs at this size: the cohort is '
          'compute-bound, not overhead-bound.',
          '- The loop and Flower pay per-client dispatch and small-matrix inefficiency; Flower adds flwr '
          'serialisation (numpy .npy bytes per array, both directions), a thread pool and a synchronous '
          'numpy round trip per client.',
          f'- Forced host devices share the same {os.cpu_count()} physical cores, so sharded/vmap cannot exceed '
          f'about {os.cpu_count()}x; the sharded rows list the collectives XLA inserted (shard_map: none).',
          '- Timings are medians of few calls on a machine that may be shared (load averages above); ratios '
          'within one cell are more stable than absolute numbers.']
  return out


# ---------------------------------------------------------------------------- a whole run
VARIANT_ORDER = ('loop', 'vmap', 'vmap_chunk', 'limit', 'sharded', 'sharded_shmap', 'flower',
                 *(round_variant_name(k, d) for d in (1, 2, 4, 8) for k in ROUND_KINDS))


def sort_rows(rows: list[dict], workloads: list[str]) -> list[dict]:
  """Rows by workload, client count, then variant in VARIANT_ORDER (chunks by k)."""
  order = {v: i for i, v in enumerate(VARIANT_ORDER)}

  def key(r):
    chunk = r['variant'].startswith('vmap_chunk')
    return (workloads.index(r['workload']), r['clients'], order['vmap_chunk'] if chunk else order.get(r['variant'], 99),
            int(r['variant'][len('vmap_chunk'):]) if chunk else 0)
  return sorted(rows, key=key)


def run_sharded_subprocess(argv: list[str], clients: list[int], workloads: list[str], devices: int,
                           variants=('sharded',)) -> list[dict]:
  """Runs `argv` (a worker command line that takes --worker_out) in a fresh process with `devices`
  forced CPU devices; returns the rows it wrote, or skip rows if it failed."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'sharded.json')
    log(f'[sharded] subprocess with XLA_FLAGS="{env["XLA_FLAGS"]}"')
    proc = subprocess.run([sys.executable, *argv, f'--worker_out={out}'], env=env)
    if proc.returncode or not os.path.exists(out):
      return [dict(workload=w, clients=c, variant=v, skip=f'subprocess failed (rc {proc.returncode})')
              for w in workloads for c in clients for v in variant_names(variants, [], c, (devices,))]
    with open(out) as f:
      return json.load(f)


def print_summary(rows: list[dict], mem_info: dict) -> None:
  """Throughput, ratios and bytes per client on stdout."""
  log('\n=== throughput ===')
  for r in rows:
    log(fmt_row(r))
  log('\n=== ratios ===')
  for r in ratio_rows(rows):
    log(f"{r['workload']:>5} {r['clients']:>5}  vmap/loop {r['vmap_loop']:>7}  best chunk k={r['best_chunk']:>3} "
        f"chunk/loop {r['chunk_loop']:>7}  vmap/limit {r['vmap_limit']:>7}  sharded/vmap {r['sharded_vmap']:>7}  "
        f"shmap/vmap {r['shmap_vmap']:>7}  vmap/flower {r['vmap_flower']:>7}")
  for h in headline_rows(rows):
    log(f"{h['workload']:>5} {h['clients']:>5}  " + '  '.join(
        f"ours/drjax@{n} {h[f'ours_drjax@{n}']} (mem {h[f'mem_ours_drjax@{n}']})" for n in h['devices'])
        + f"  ours@1/loop {h['ours_loop']}  ours@1/limit {h['ours_limit']}")
  log('\n=== bytes per client ===')
  for wl, m in mem_info.items():
    log(f'{wl}: {m["per_client"]}  text {m["text"]}')
  for d in memory_slopes(rows):
    log(f"{d['workload']} {d['variant']} {d['clients']}: XLA peak {d['peak_per_client'] / 1024:,.1f} KiB/client"
        + (f", RSS {d['rss_per_client'] / 1024:,.1f} KiB/client" if 'rss_per_client' in d else ''))


def report_settings(clients: list[int], workloads: list[str], variants: list[str], cell: dict, mem_info: dict,
                    max_mem_gb: float, total_budget_s: float) -> dict:
  """The settings block of RESULTS.md (`cell`: the keyword arguments of run_cells)."""
  return dict(clients=clients, workloads={w: {**WORKLOADS[w], **mem_info.get(w, {}).get('text', {})}
                                          for w in workloads},
              variants=variants, **{k: v for k, v in cell.items() if k not in ('max_mem', 'deadline', 'on_row')},
              max_mem_gb=max_mem_gb,
              local_update='client private (AMT) stage: LM + 0.1 * GRAM CCL, all trainable parts, '
                           'clipped AdamW; `steps` steps per call via lax.scan (NodeProgram.run_stage)',
              total_budget_s=total_budget_s,
              processes='loop, vmap, vmap_chunk, limit, flower: this process, 1 CPU device; '
                        f'sharded, sharded_shmap: one subprocess per workload with {cell.get("devices")} forced '
                        'CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)')
