"""Many federations as one program: R runs of one structure on a leading run axis.

Runs that differ only in their seeds (training `seed`, partition `data.seed`), learning rates, the
method's loss weights and temperatures, the multimodal baseline's modality dropout and MMA's backbone weighting
(`RUN_FIELDS`) share every compiled function: each cohort's round, the
server stage and the decoders take every run at once and are compiled once for all of them; inside, the runs
are `jax.vmap`ped (on accelerators) or computed one after another in a loop (`jax.lax.map`, on a CPU; `run_batch`).
What a round does on the host (sampling, simulated faults, the ledger,
aggregation and the server's targets, metrics) stays per run, in a loop, through the same functions as
a single run (`ml_ecs.core.round`), so R runs in one program give the metrics of R separate runs.

  runs, state = init(cfgs)          # state: a `State` whose every leaf has a leading [R] axis
  state, rows = run_round(runs, state)   # rows: one metrics dict per run
  evals = evaluate(runs, state)     # one evaluation dict per run
  views(state)                      # each run's `State`

Learning rates, loss weights and temperatures and the modality dropout are optimizer state
(`build.init(hparams_in_state=True)`, `node.make_optimizer`), so the optimizer states of these runs hold them;
whether a loss term (or the dropout) is on (> 0) is part of the program, so it must agree, and everything else of a run's config must equal
the first run's (`check_configs` names what differs). A run's data is padded to the longest run's rows on the run
axis; sampling draws by count, so padding rows are never drawn.

With several devices the run axis may be split over them (`init(..., run_devices=k)`): a 2-D mesh (runs x
clients, `build.client_mesh`), every run-stacked array sharded on its leading axis and the vmaps named for the
run axis (`spmd_axis_name`), so each device trains whole runs with no traffic between devices; each run's
clients are split over the rest of the mesh.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ml_ecs.algorithms.base import Uploads
from ml_ecs.algorithms.ml_ecs import amt
from ml_ecs.aggregation.mean import clients_finite
from ml_ecs.config.identity import config_differences
from ml_ecs.core import build, evaluate as evaluation, round as round_lib
from ml_ecs.core.cohort_map import RUN_AXIS
from ml_ecs.core.compile_ahead import compile_ahead
from ml_ecs.core.node import LOSS_HPARAMS
from ml_ecs.core.setup import Setup
from ml_ecs.core.state import CohortRound, NodeState, State
from ml_ecs.data.cohort_data import SplitArrays
from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.data.loaders import load_dataset
from ml_ecs.models.multimodal import model_options

# The fields in which the runs of one program may differ (config paths): seeds, the hyperparameters that are
# optimizer state (node.make_optimizer, node.LOSS_HPARAMS), and MMA's backbone weighting, which only sets each
# run's client weights on the host (`Setup.weights`, read by its aggregation), never a compiled function.
RUN_FIELDS = ('seed', 'data.seed', 'train.learning_rate', 'method.mma_backbone') + tuple(
    f'method.{k}' for k in LOSS_HPARAMS)
# Of those, the weights whose sign decides whether a loss term exists: all runs of a program agree on it.
SWITCHES = tuple(f'method.{k}' for k in LOSS_HPARAMS if not k.startswith('tau'))


def _get(d: dict, field: str):
  for part in field.split('.'):
    d = d.get(part, {}) if isinstance(d, dict) else {}
  return d


def _switches(d: dict) -> dict[str, bool]:
  """Which `SWITCHES` a config (as a dict) has on (> 0)."""
  return {f: (_get(d, f) or 0) > 0 for f in SWITCHES}


def check_configs(cfgs: Sequence[ml_collections.ConfigDict]) -> None:
  """Raises ValueError naming the fields outside `RUN_FIELDS` in which a run differs from the first, or
  the `SWITCHES` that are on (> 0) in one run and off in the other."""
  if not cfgs:
    raise ValueError('a program of runs needs at least one config')
  first = cfgs[0].to_dict()
  for i, cfg in enumerate(cfgs[1:], 1):
    d = cfg.to_dict()
    differ = [f for f in config_differences(first, d) if f not in RUN_FIELDS]
    if differ:
      raise ValueError(f'run {i} differs from run 0 in {differ}: runs of one program may differ only in '
                       f'{list(RUN_FIELDS)} (run the others as another program)')
    on, on_first = _switches(d), _switches(first)
    switched = [f for f in SWITCHES if on[f] != on_first[f]]
    if switched:
      raise ValueError(f'run {i} turns {switched} on or off against run 0: a loss term is on (weight > 0) in '
                       'every run of a program or in none (run the others as another program)')


def program_key(cfg: ml_collections.ConfigDict) -> str:
  """What configs that may share a program (`check_configs`) have in common: the config without `RUN_FIELDS`,
  with each of the `SWITCHES` as on or off."""
  d = cfg.to_dict()
  switches = _switches(d)
  for field in RUN_FIELDS:
    parent, _, leaf = field.rpartition('.')
    node = _get(d, parent) if parent else d
    if isinstance(node, dict):
      node.pop(leaf, None)
  return json.dumps([d, switches], sort_keys=True, default=repr)


def per_run_sharding(mesh) -> NamedSharding:
  """Where an array stacked on the run axis lives: split over the mesh's run axis where it has one, else
  replicated (as stacking on the devices, and the rounds' outputs, place it)."""
  return NamedSharding(mesh, P(RUN_AXIS) if RUN_AXIS in mesh.axis_names else P())


def _host_stack(xs: Sequence[Any], pad_axis: int | None = None) -> Any:
  """Same-structured arrays stacked on a new leading (run) axis through host memory, each first zero-padded
  along `pad_axis` to the longest. For what is built once: stacking on the devices compiles a program per
  leaf shape (measured: most of the stacking's 7.5 s of a 4-run program's set-up); typed PRNG keys are
  stacked there."""
  if jax.dtypes.issubdtype(xs[0].dtype, jax.dtypes.prng_key):
    return jnp.stack(xs)
  arrays = [np.asarray(x) for x in xs]
  if pad_axis is not None and arrays[0].ndim > pad_axis:
    n = max(a.shape[pad_axis] for a in arrays)
    arrays = [np.pad(a, [(0, n - a.shape[pad_axis]) if i == pad_axis else (0, 0) for i in range(a.ndim)])
              for a in arrays]
  x = xs[0]
  if isinstance(getattr(x, 'sharding', None), NamedSharding):
    sharding = per_run_sharding(x.sharding.mesh)
  else:
    sharding = x.sharding if getattr(x, 'committed', False) else None
  return jax.device_put(np.stack(arrays), sharding)


def _stack_once(trees: Sequence[Any], pad_axis: int | None = None) -> Any:
  """Trees built once (set-up, evaluation data) stacked on a new leading (run) axis through the host, each
  leaf first zero-padded along `pad_axis` to the longest when given."""
  return jax.tree.map(lambda *xs: _host_stack(xs, pad_axis), *trees)


def stack(trees: Sequence[Any]) -> Any:
  """Same-shaped trees stacked on a new leading (run) axis (on the devices: what each round makes)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@jax.jit
def _run_slice(tree: Any, r: jax.Array) -> Any:
  # One compiled call per run, the run an argument: slicing each leaf eagerly costs a dispatch per leaf and run
  # (measured: most of a round's host time at 4 runs), and one program returning every run's slice compiled
  # for 23 s on the first evaluation of 10 comparison cells (this one: 4.3 s).
  return jax.tree.map(lambda x: x[r], tree)


def views(state: State, cohorts: bool = False) -> list[State]:
  """Every run of a stacked state; without its cohorts (what aggregation and the server read) unless asked."""
  parts = (state.cohorts if cohorts else (), state.server, state.global_shared, state.server_z, state.round,
           state.rng, state.algorithm)
  sharding = getattr(state.round, 'sharding', None)
  if isinstance(sharding, NamedSharding) and RUN_AXIS in sharding.mesh.axis_names:
    # Split over devices: gathered first, so the slicing is compiled as for one device (measured on 10 comparison
    # cells with the former slicer, which returned every run's slice at once: first call 118 s split, 51 s
    # gathered, 30 s on one device; not measured again with `_run_slice`).
    parts = jax.device_put(parts, NamedSharding(sharding.mesh, P()))
  return [State(*_run_slice(parts, np.int32(r))) for r in range(int(state.round.shape[0]))]


def _same(trees: Sequence[Any]) -> bool:
  first = jax.tree.leaves(trees[0])
  return all(len(first) == len(leaves) and all(np.array_equal(a, b) for a, b in zip(first, leaves))
             for leaves in map(jax.tree.leaves, trees[1:]))


@dataclasses.dataclass(frozen=True)
class Runs:
  """R federations of one structure: each run's `Setup` (its host parts, evaluation data, accounting),
  the per-run device data stacked on the run axis, and the compiled functions over the run axis."""
  setups: tuple[Setup, ...]
  train: tuple[SplitArrays, ...]               # per cohort [R, C, N, ...]
  public: tuple[SplitArrays, ...]              # per cohort [R, C, N, ...]
  holdout: tuple[SplitArrays | None, ...]      # per cohort [R, N, ...] (SE-CCL reliability) or None
  public_train: SplitArrays                    # [R, N_public, ...] the server's split
  edge_frozen: Any                             # shared, or [R, ...] where the runs' backbones differ
  server_frozen: Any
  round_fns: tuple[Callable[..., CohortRound], ...]
  server_round_fn: Callable
  generate_fns: tuple[Callable, ...]           # per cohort: (trainables, split, frozen) -> answer tokens, over runs
  global_generate_fns: tuple[Callable, ...]    # the same through the global view (trainables, global LoRA, ...)
  server_generate_fn: Callable
  batch: int                                   # runs computed at once by each compiled call (`run_batch`)
  eval_splits: dict = dataclasses.field(default_factory=dict)   # split name -> (per cohort, server) stacked

  @property
  def size(self) -> int:
    return len(self.setups)


def _share_functions(setup: Setup, first: Setup) -> Setup:
  """`setup` with the first run's compiled functions (equal programs: one compilation for all runs)."""
  cohorts = tuple(dataclasses.replace(c, round_fn=c0.round_fn, generate_fn=c0.generate_fn)
                  for c, c0 in zip(setup.cohorts, first.cohorts))
  return dataclasses.replace(setup, cohorts=cohorts, aggregate_fn=first.aggregate_fn, targets_fn=first.targets_fn,
                             server_round_fn=first.server_round_fn, server_generate_fn=first.server_generate_fn,
                             server_reliability_fn=first.server_reliability_fn)


class DifferentStructure(ValueError):
  """Runs whose federations differ in structure (cohorts, public split): they cannot share a program."""


def _check_structure(setups: Sequence[Setup]) -> None:
  s0 = setups[0]
  for i, s in enumerate(setups[1:], 1):
    layout = lambda x: [(c.data.modalities, len(c.client_ids), c.num_real, c.num_selected) for c in x.cohorts]
    if layout(s) != layout(s0):
      raise DifferentStructure(f'run {i} has cohorts {layout(s)} but run 0 {layout(s0)} (modalities, stacked, real, '
                       'selected clients): runs of one program need the same cohorts')
    if s.num_public != s0.num_public:
      raise DifferentStructure(f'run {i} has {s.num_public} public training samples but run 0 {s0.num_public}: runs of '
                       'one program need public splits of one size')
  if any(c.host for c in s0.cohorts) or jax.process_count() > 1:
    raise ValueError('runs of one program hold their state on the devices of one process '
                     '(train.host_state=False, one process)')


def _over_runs(fn: Callable, in_axes: tuple, split: bool, batch: int | None, **jit) -> Callable:
  """`fn` of one run over the run axis (the arguments whose `in_axes` is 0), jitted. `batch` None: vmapped over
  every run, the vmap named for the mesh's run axis when the runs are split over devices (each device's
  shard_map blocks then hold whole runs); else `batch` runs vmapped at a time, the batches one after another in
  a loop inside the program (`jax.lax.map`)."""
  if batch is None:
    return jax.jit(jax.vmap(fn, in_axes=in_axes, spmd_axis_name=RUN_AXIS if split else None), **jit)
  mapped = [i for i, axis in enumerate(in_axes) if axis is not None]

  def over(*args):
    def one(xs):
      full = list(args)
      for i, x in zip(mapped, xs):
        full[i] = x
      return fn(*full)
    return jax.lax.map(one, tuple(args[i] for i in mapped), batch_size=None if batch == 1 else batch)
  return jax.jit(over, **jit)


def _lift_round(fn: Callable, frozen_axis: int | None, holdout: bool, split: bool, batch: int | None) -> Callable:
  axes = (0,) * 8 + (frozen_axis, 0, 0 if holdout else None)
  return _over_runs(fn, axes, split, batch, donate_argnums=(0, 1))


def _global_generate(generate_fn: Callable, gates: str, frozen_axis: int | None, split: bool, batch: int | None
                     ) -> Callable:
  def one(tr, global_shared, split_arrays, frozen):
    return generate_fn(amt.global_view(tr, global_shared, gates), split_arrays, frozen)
  return _over_runs(one, (0, 0, 0, frozen_axis), split, batch)


def run_split(runs: int, run_devices: int) -> int:
  """How many devices a program of `runs` runs splits its run axis over when asked for `run_devices`: the
  largest count that divides both (each device holds as many runs)."""
  if run_devices < 1:
    raise ValueError(f'run_devices={run_devices}: expected >= 1 (1: the run axis on every device)')
  return math.gcd(runs, run_devices)


def run_batch(runs: int, split: int, asked: int | None = None, platform: str | None = None) -> int | None:
  """How many of a program's `runs` one compiled call computes at once (None: all, vmapped), for `asked` (None:
  the platform's default) with the run axis split over `split` devices. On a CPU one run after another
  (measured: a later round of 10 comparison cells 6.2 s one at a time against 7.1-7.3 s vmapped, docs/scale.md,
  as a vmapped run's larger arrays no longer fit the caches and its convolutions become grouped ones); on an
  accelerator, which one small run leaves idle, all at once. A split run axis is vmapped (its devices hold whole
  runs)."""
  if asked is not None and asked < 1:
    raise ValueError(f'run_batch={asked}: expected >= 1 runs at a time (or None: the platform\'s default)')
  if split > 1:
    if asked is not None and asked < runs:
      raise ValueError(f'run_batch={asked} with the run axis over {split} devices: a split run axis computes '
                       'all its runs at once (leave run_batch unset, or run_devices=1)')
    return None
  batch = asked if asked is not None else (1 if (platform or jax.default_backend()) == 'cpu' else runs)
  return None if batch >= runs else batch


def init(cfgs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str | None] | None = None,
         dataset: MultimodalDataset | None = None, log: Callable[[str], None] = print,
         cache_dir: str | None = None, run_devices: int = 1, run_batch_size: int | None = None
         ) -> tuple[Runs, State]:
  """Builds R federations (validated configs that differ only in `RUN_FIELDS`) as one program. `run_devices`:
  split the run axis over that many of the mesh's devices (`run_split`: fewer where R does not divide), each
  run's clients over the rest; 1 keeps every run on every device, its clients split over them.
  `run_batch_size`: runs computed at once by each compiled call (`run_batch`; None: the platform's default)."""
  check_configs(cfgs)
  split = run_split(len(cfgs), run_devices)
  batch = run_batch(len(cfgs), split, run_batch_size)
  ds = dataset if dataset is not None else load_dataset(cfgs[0].data)
  workdirs = list(workdirs) if workdirs is not None else [None] * len(cfgs)
  built, traced = [], {}   # traced: the models' inits and graphs, traced once per training seed, not per run
  for r, (cfg, w) in enumerate(zip(cfgs, workdirs)):
    built.append(build.init(cfg, workdir=w, dataset=ds, log=log if r == 0 else (lambda s: None),
                            cache_dir=cache_dir, hparams_in_state=True, jit_cache=traced, run_devices=split))
    _check_structure([s for s, _ in built])   # refuse at the first run that differs, before building the rest
  setups = [s for s, _ in built]
  first = setups[0]
  setups = [first] + [_share_functions(s, first) for s in setups[1:]]
  edge_same, server_same = _same([s.edge_frozen for s in setups]), _same([s.server_frozen for s in setups])
  frozen_axis = None if edge_same and server_same else 0
  shared_or_stacked = lambda trees: trees[0] if frozen_axis is None else _stack_once(trees)
  runs = Runs(
      setups=tuple(setups),
      train=tuple(_stack_once([s.cohorts[k].data.train for s in setups], 1) for k in range(len(first.cohorts))),
      public=tuple(_stack_once([s.cohorts[k].data.public for s in setups], 1) for k in range(len(first.cohorts))),
      holdout=tuple(None if c.holdout is None else _stack_once([s.cohorts[k].holdout for s in setups], 0)
                    for k, c in enumerate(first.cohorts)),
      public_train=_stack_once([s.public_train for s in setups]),
      edge_frozen=shared_or_stacked([s.edge_frozen for s in setups]),
      server_frozen=shared_or_stacked([s.server_frozen for s in setups]),
      round_fns=tuple(_lift_round(c.round_fn, frozen_axis, c.holdout is not None, split > 1, batch)
                      for c in first.cohorts),
      server_round_fn=_over_runs(first.server_round_fn, (0,) * 5 + (frozen_axis, 0), split > 1, batch),
      generate_fns=tuple(_over_runs(c.generate_fn, (0, 0, frozen_axis), split > 1, batch) for c in first.cohorts),
      global_generate_fns=tuple(_global_generate(c.generate_fn, model_options(first.cfg)['gates'], frozen_axis,
                                                 split > 1, batch) for c in first.cohorts),
      server_generate_fn=_over_runs(first.server_generate_fn, (0, frozen_axis, 0), split > 1, batch),
      batch=len(setups) if batch is None else batch)
  log(f'{len(setups)} runs as one program (backbones {"shared" if frozen_axis is None else "per run"}; '
      f'run axis over {split} of {first.mesh.size} device(s)'
      f'{"" if split == run_devices else f", {run_devices} asked"}; '
      f'{"all runs at once" if batch is None else f"{batch} run(s) at a time"})')
  state = _stack_once([s for _, s in built])
  # The key data placed as a round leaves it (derived from the views' keys), so the views of round 1 and of the
  # later rounds share one compiled program.
  return runs, dataclasses.replace(state, rng=jax.device_put(state.rng, per_run_sharding(first.mesh)))


@jax.jit
def _finite_per_run(trainables) -> jax.Array:
  """[R, C] bool: every trainable leaf of client c of run r is finite."""
  return jax.vmap(clients_finite)(trainables)


def _resync(runs: Runs, k: int, cs: NodeState, state: State, ledgers: list) -> NodeState:
  """Re-syncs the diverged clients of cohort k in the runs where there are any (rare: one run at a time)."""
  bad = ~np.asarray(_finite_per_run(cs.trainables))
  for r in np.flatnonzero(bad[:, :runs.setups[0].cohorts[k].num_real].any(1)):   # real clients: the same count per run
    setup = runs.setups[r]
    one = jax.tree.map(lambda x: x[r], cs)
    gs = jax.tree.map(lambda x: x[r], state.global_shared)
    fixed = round_lib.resync(setup, setup.cohorts[k], one, gs, ledgers[r])
    cs = jax.tree.map(lambda a, b: a.at[r].set(b), cs, fixed)
  return cs


def run_round(runs: Runs, state: State) -> tuple[State, list[dict[str, Any]]]:
  """One communication round of every run; returns the new stacked state and each run's metrics.

  The cohorts' trainables and optimizer states of `state` are donated (consumed)."""
  t0 = time.perf_counter()
  R, setups = runs.size, runs.setups
  views_ = views(state)
  keys = [round_lib.round_keys(v) for v in views_]
  contexts = [s.algorithm.round_context(s, v) for s, v in zip(setups, views_)]
  # Per-round inputs in one sharding every round, so rounds reuse one compilation (a value computed by a
  # jitted function and one made on the host would otherwise differ in placement).
  per_run = per_run_sharding(setups[0].mesh)
  alignment = None if contexts[0][0] is None else stack([a for a, _ in contexts])
  global_shared, server_z, alignment = jax.device_put((state.global_shared, state.server_z, alignment), per_run)
  key_stack = lambda ks: jax.random.wrap_key_data(jnp.stack([jax.random.key_data(k) for k in ks]))
  ledgers = [round_lib._Ledger() for _ in range(R)]
  server_keys = key_stack([kr.server for kr in keys])
  server_args = lambda targets, has_target: (   # noqa: E731  (one place for the call and its compilation)
      state.server.trainables, state.server.opt_state, server_keys,
      *jax.device_put((targets, has_target.astype(jnp.float32)), per_run), runs.server_frozen, runs.public_train)
  # In passes, as a single run's round (round_lib.run_round): re-syncs and samples; every cohort's update
  # dispatched (the first round compiles the cohorts' and the server's programs together); then each
  # cohort's result read and what arrived, while the later cohorts run.
  synced = [_resync(runs, k, cs, state, ledgers) for k, cs in enumerate(state.cohorts)]
  drawn = [[round_lib.sample(s.cohorts[k], kr, k) for s, kr in zip(setups, keys)] for k in range(len(synced))]
  args = [(cs.trainables, cs.opt_state, runs.train[k], runs.public[k],
           jnp.asarray(np.stack([sel for _, _, sel in d])), key_stack([ck for ck, _, _ in d]),
           global_shared, server_z, runs.edge_frozen, alignment, runs.holdout[k])
          for k, (cs, d) in enumerate(zip(synced, drawn))]
  calls = [*((fn, lambda a=a: a) for fn, a in zip(runs.round_fns, args)),
           (runs.server_round_fn, lambda: server_args(state.server_z, jnp.zeros(state.server_z.shape[:2], bool)))]
  dispatched = [runs.round_fns[k](*args[k]) for k in compile_ahead(calls) if k < len(runs.round_fns)]
  cohorts, outs, weights, presence, rows = [], [[] for _ in range(R)], [[] for _ in range(R)], \
      [[] for _ in range(R)], [[] for _ in range(R)]
  for k, (out, d) in enumerate(zip(dispatched, drawn)):
    cohorts.append(NodeState(out.trainables, out.opt_state))
    uploaded = jax.device_get(out._replace(trainables=None, opt_state=None))   # the host work reads numpy views
    for r, (s, (_, real, sel)) in enumerate(zip(setups, d)):
      c = s.cohorts[k]
      out_r = jax.tree.map(lambda x: x[r], uploaded)
      w, pres = round_lib.arrivals(s, c, out_r, real, sel, jax.random.fold_in(keys[r].faults, k), ledgers[r])
      outs[r].append(out_r), weights[r].append(w), presence[r].append(pres), rows[r].append(c.client_ids[sel])
  t_cohorts = time.perf_counter()
  done = [round_lib.aggregate(s, v, Uploads(tuple(outs[r]), tuple(weights[r]), tuple(presence[r]),
                                            np.concatenate(rows[r])), keys[r].key, contexts[r][1])
          for r, (s, v) in enumerate(zip(setups, views_))]
  t_aggregate = time.perf_counter()
  targets, has_target = jnp.stack([d[1] for d in done]), jnp.stack([d[2] for d in done])
  server_tr, server_opt, server_metrics, server_z = runs.server_round_fn(*server_args(targets, has_target))
  server_host = jax.device_get(server_metrics)
  metrics = [round_lib.round_metrics(s, d[0], d[3], ledgers[r], {n: v[r] for n, v in server_host.items()},
                                     int(views_[r].round) + 1) for r, (s, d) in enumerate(zip(setups, done))]
  jax.block_until_ready(server_z)
  # What is stacked here is placed as init placed it, so the views and the decoders of every round (and a restored
  # checkpoint) see one sharding: one compilation each.
  new_state = State(cohorts=tuple(cohorts), server=NodeState(server_tr, server_opt),
                    global_shared=jax.device_put(stack([d[0].shared for d in done]), per_run), server_z=server_z,
                    round=state.round + 1, rng=jax.device_put(jnp.stack([jax.random.key_data(kr.rng) for kr in keys]),
                                                              per_run),
                    algorithm=jax.device_put(stack([d[0].state for d in done]), per_run))
  t_end = time.perf_counter()
  timing = {'time/round_s': t_end - t0, 'time/cohorts_s': t_cohorts - t0,
            'time/aggregate_s': t_aggregate - t_cohorts, 'time/server_s': t_end - t_aggregate, 'time/runs': R}
  return new_state, [{**m, **timing} for m in metrics]


def _eval_split(runs: Runs, split: str) -> tuple[tuple[SplitArrays, ...], SplitArrays]:
  """Every run's `split` ('test' or 'val') stacked on the run axis: per cohort, and the server's."""
  if split not in runs.eval_splits:
    cohorts = tuple(_stack_once([s.cohorts[k].data.eval_split(split)[0] for s in runs.setups], 1)
                    for k in range(len(runs.setups[0].cohorts)))
    runs.eval_splits[split] = (cohorts, _stack_once([evaluation.server_split(s, split)[0] for s in runs.setups], 0))
  return runs.eval_splits[split]


def generate(runs: Runs, state: State, split: str = 'test') -> list[evaluation.Generated]:
  """Every run's answers on `split`, each cohort's (own and global models) and the server's decoded for all
  runs in one call."""
  cohorts, server = _eval_split(runs, split)
  own = [runs.generate_fns[k](cs.trainables, data, runs.edge_frozen) for k, (cs, data) in
         enumerate(zip(state.cohorts, cohorts))]
  glob = ([runs.global_generate_fns[k](cs.trainables, state.global_shared, data, runs.edge_frozen)
           for k, (cs, data) in enumerate(zip(state.cohorts, cohorts))] if runs.setups[0].communicate else None)
  own, glob, srv = jax.device_get((own, glob, runs.server_generate_fn(state.server.trainables, runs.server_frozen,
                                                                        server)))
  return [evaluation.Generated([t[r] for t in own], None if glob is None else [t[r] for t in glob], srv[r])
          for r in range(runs.size)]


def evaluate(runs: Runs, state: State, split: str = 'test', full: bool = False) -> list[dict[str, Any]]:
  """Each run's evaluation (`ml_ecs.core.evaluate.evaluate`): answers decoded for every run in one call per
  cohort (`generate`), scored run by run; with eval.clients_per_eval sampling, run by run."""
  setups = runs.setups
  sampled = any(p is not None for s in setups for p in evaluation.eval_positions(s, int(state.round[0]), full))
  t0 = time.perf_counter()
  generated = [None] * runs.size if sampled else generate(runs, state, split)
  t_generate = time.perf_counter() - t0
  out = [evaluation.evaluate(s, v, split, full, g) for s, v, g in zip(setups, views(state, cohorts=True), generated)]
  for row in out:   # the decoding is shared: each run's time is its scoring plus its share of the decoding
    row['time/eval_s'] += t_generate / runs.size
  return out
