"""The ML-ECS federation as a functional core: `init` -> (Setup, State); `run_round`; `evaluate`.

A round: the server's fused representations of the public split and the
aggregated shared LoRA go down (broadcast) -> every sampled client of every
cohort runs its AMT stages (one jitted `cohort_map` per cohort: public stage with
SE-CCL, private stage with CCL) -> clients upload shared LoRA and public fused
representations -> MMA aggregates the shared LoRA over all cohorts -> the server
trains on the public split (LM + CCL + SE-CCL toward the weighted mean of the
clients' representations, `se_ccl_targets`) and sends its new representations.

`Setup` is immutable: config, data, tokenizer, mesh, programs, frozen backbones,
cohort data on the devices and compiled functions. `State` is a registered
pytree of everything that changes: per-cohort trainables and optimizer states,
the server's, the global shared LoRA, the server's representations, the round
number and the RNG key (client sampling is a pure function of the round's key).
Method switches (config `method`) turn the same round into the baselines and
ablations (ml_ecs.algorithms.registry).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ml_ecs.algorithms.ml_ecs import amt, mma, se_ccl
from ml_ecs.backbones import resolve as backbones
from ml_ecs.core import communication, distributed, faults
from ml_ecs.models import params
from ml_ecs.aggregation import privacy, robust
from ml_ecs.data.cohort_data import CohortData, SplitArrays, cohort_data, full_modality_split
from ml_ecs.core.cohort_map import CLIENT_AXIS, cohort_map
from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.data.loaders import load_dataset
from ml_ecs.data.partition import Partition, partition
from ml_ecs.core.scoring import SCORE_NAMES, TextScorer
from ml_ecs.models.multimodal import MultimodalLM, model_options
from ml_ecs.core.node import NodeProgram, make_optimizer, sub
from ml_ecs.backbones.pretrain import cached_backbone
from ml_ecs.data.text import TaskText, build_task_text


# ---------------------------------------------------------------------------- state
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NodeState:
  """Trainables and optimizer state of one node, or of a cohort stacked on the client axis."""
  trainables: dict
  opt_state: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
  """Everything a round changes. `rng` is raw key data (uint32), so the state checkpoints as arrays."""
  cohorts: tuple[NodeState, ...]   # client axis padded as in CohortSetup
  server: NodeState
  global_shared: nnx.State         # the aggregated shared LoRA (what the next round broadcasts)
  server_z: jax.Array              # [N_public, d_z] server representations of the public split
  round: jax.Array                 # int32 scalar: rounds completed
  rng: jax.Array                   # key data of the next round's key


class CohortRound(NamedTuple):
  """What one cohort's jitted round returns (selected clients only for the metrics and uploads)."""
  trainables: dict        # all stacked clients, the selected ones updated
  opt_state: dict
  metrics: dict           # [selected] per loss term
  shared: nnx.State       # [selected] uploaded shared LoRA
  z: jax.Array            # [selected, N, d_z] uploaded public representations
  z_valid: jax.Array      # [selected, N]
  public_ids: jax.Array   # [selected, N] public positions of z


# ---------------------------------------------------------------------------- setup
@dataclasses.dataclass(frozen=True)
class CohortSetup:
  """Clients of one structure: their data on the devices, program and compiled functions.

  The client axis holds the `num_real` clients first, then zero-weight padding
  clients (copies of client 0's data, id -1) up to a multiple of the device count;
  padding never reaches aggregation or metrics. `rows`: the client positions whose data
  this process built and holds (all of them with one process; `data.clients` names all).
  """
  data: CohortData
  program: NodeProgram
  client_ids: np.ndarray    # [C_pad], -1 for padding
  num_real: int
  num_sampled: int          # real clients sampled per round
  num_selected: int         # sampled + padding, a multiple of the device count
  round_fn: Callable[..., CohortRound]
  generate_fn: Callable
  resync_fn: Callable | None = None   # re-syncs diverged clients (ml_ecs.core.faults.make_resync)
  host: bool = False        # train.host_state: state and data stay in host numpy; only the sampled block moves
  rows: slice = dataclasses.field(default_factory=lambda: slice(None))   # this process's clients


@dataclasses.dataclass(frozen=True)
class Setup:
  """The immutable part of a federation."""
  cfg: ml_collections.ConfigDict
  dataset: MultimodalDataset
  text: TaskText
  partition: Partition
  scorer: TextScorer
  modalities: tuple[str, ...]
  mesh: Mesh
  stages: amt.Stages
  edge_frozen: nnx.State           # replicated once per device, shared by every client on it
  server_frozen: nnx.State
  cohorts: tuple[CohortSetup, ...]
  server_program: NodeProgram
  public_train: SplitArrays        # the server's view (all modalities), without a client axis
  public_test: SplitArrays
  public_val: SplitArrays | None   # the server's validation split (data.client_val_fraction > 0)
  leaf_mod: Any                    # modality index per shared leaf (-1: not modality-specific)
  weights: np.ndarray              # MMA weight per client id (backbone LoRA)
  modality_weights: np.ndarray     # [clients, M] MMA weight of the modality-specific leaves
  accounting: communication.Accounting
  pretrain_info: dict
  aggregate_fn: Callable
  targets_fn: Callable
  server_round_fn: Callable
  server_generate_fn: Callable
  server_reliability_fn: Callable  # the server's SE-CCL reliability (LM loss on its labelled public split)
  backbones: dict[str, Any] = dataclasses.field(default_factory=dict)   # backbones.Backbones.describe()
  model_cfgs: dict[str, Any] = dataclasses.field(default_factory=dict)  # model configs, resolved backbones

  @property
  def num_public(self) -> int:
    return len(self.partition.public_train_idx)

  @property
  def communicate(self) -> bool:
    return bool(self.cfg.method.communicate)

  @property
  def sends_representations(self) -> bool:
    return self.communicate and bool(self.cfg.method.se_ccl)


def _per_client_keys(key: jax.Array, positions: jax.Array) -> jax.Array:
  """One key per client position, independent of how many clients are stacked or padded."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(positions)


def _broadcast_to_clients(global_tree, stacked):
  """`global_tree` repeated along the leading client axis of `stacked` (same structure)."""
  return jax.tree.map(lambda g, x: jnp.broadcast_to(g, x.shape), global_tree, stacked)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def bucket(n: int, multiple: int = 1) -> int:
  """Padded block size for `n` clients: the next power of two, rounded up to `multiple` (the device
  count), so blocks of any size up to it share one compiled function."""
  return _round_up(1 << max(int(n) - 1, 0).bit_length(), multiple)


def pad_positions(pos: np.ndarray, size: int) -> np.ndarray:
  """`pos` padded to `size` with copies of its first entry (their results are discarded)."""
  pos = np.asarray(pos, np.int64)
  return np.concatenate([pos, np.full(size - len(pos), pos[0], np.int64)])


@jax.jit
def _take_clients(tree, pos):
  return jax.tree.map(lambda x: x[pos], tree)


def gather_clients(tree, pos: np.ndarray, sharding=None):
  """Rows `pos` of every leaf of a client-stacked tree: host (numpy) leaves are gathered on the host
  and only the block is placed on the devices (`sharding`); device leaves are gathered there."""
  if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree)):
    block = jax.tree.map(lambda x: np.take(x, pos, axis=0), tree)
    return jax.device_put(block, sharding) if sharding is not None else block
  return _take_clients(tree, jnp.asarray(pos))


def scatter_clients(host_tree, pos: np.ndarray, block) -> None:
  """Writes the rows of `block` (device or host) back into the host arrays of `host_tree` at `pos`,
  in place: the host counterpart of donating the state to the compiled round."""
  jax.tree.map(lambda h, b: h.__setitem__(pos, np.asarray(b)), host_tree, block)


def host_init(init_fn: Callable, keys: jax.Array, block: int) -> Any:
  """`init_fn(keys)` (a client-stacked tree) computed `block` keys at a time and written into host
  numpy arrays, so the devices hold one block, never the whole cohort."""
  n, out = len(keys), None
  for i in range(0, n, block):
    pos = np.arange(i, min(i + block, n))
    part = jax.tree.map(np.asarray, init_fn(keys[jnp.asarray(pad_positions(pos, block))]))
    if out is None:
      out = jax.tree.map(lambda x: np.empty((n,) + x.shape[1:], x.dtype), part)
    scatter_clients(out, pos, jax.tree.map(lambda x: x[:len(pos)], part))
  return out


def host_bytes_per_client(setup: Setup, state: State) -> float:
  """Host bytes one client holds in a host_state federation: its trainables, optimizer state and
  data splits (every stacked leaf's row), averaged over the cohorts' stacked clients."""
  total = rows = 0
  for c, cs in zip(setup.cohorts, state.cohorts):
    splits = [getattr(c.data, s) for s in ('train', 'test', 'public', 'val') if getattr(c.data, s) is not None]
    total += sum(x.nbytes for x in jax.tree.leaves((cs, splits)))
    rows += len(c.client_ids)
  return total / rows


def stack_init(model_fn: Callable[[nnx.Rngs], nnx.Module], keys: jax.Array, out_shardings=None) -> dict:
  """Trainable parts of one freshly initialised model per key, stacked (one compiled init)."""
  def init(key):
    return sub(params.split_model(model_fn(nnx.Rngs(key)))[1], params.TRAINABLE)
  return jax.jit(jax.vmap(init), out_shardings=out_shardings)(keys)


def client_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (0 = all) with the client axis. With several
  processes it spans every process's devices, in process order, so each holds a contiguous block."""
  n = num_devices or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f'mesh.num_devices={n} but only {jax.device_count()} devices are visible')
  if jax.process_count() > 1 and n != jax.device_count():
    raise ValueError(f'mesh.num_devices={n}: with {jax.process_count()} processes the client mesh spans all '
                     f'{jax.device_count()} devices (set 0)')
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices[:n]), (CLIENT_AXIS,))


def make_cohort_round(program: NodeProgram, stages: amt.Stages, mesh: Mesh, chunk: int, communicate: bool,
                      full: bool) -> Callable[..., CohortRound]:
  """One jitted round of a cohort: broadcast -> AMT client updates (cohort_map) -> uploads.

  `full`: every stacked client is selected (no gather/scatter). Trainables and optimizer
  states are donated.
  """
  update = cohort_map(functools.partial(amt.client_update, program, stages), 5, chunk=chunk, mesh=mesh)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def round_fn(tr_all, opt_all, train_all, public_all, sel, rng, global_shared, server_z, frozen,
               se_ctx=None) -> CohortRound:
    take = (lambda t: t) if full else (lambda t: jax.tree.map(lambda x: x[sel], t))
    tr, opt, train, public = take(tr_all), take(opt_all), take(train_all), take(public_all)
    if communicate:
      tr = {**tr, 'shared': _broadcast_to_clients(global_shared, tr['shared'])}
    ctx = {'frozen': frozen, 'targets': server_z, 'target_valid': jnp.ones(server_z.shape[:1]),
           'ref_shared': global_shared, **(se_ctx or {})}
    out = update(tr, opt, train, public, _per_client_keys(rng, sel), ctx)
    if full:
      tr_all, opt_all = out.trainables, out.opt_state
    else:
      put = lambda all_, part: jax.tree.map(lambda f, p: f.at[sel].set(p), all_, part)
      tr_all, opt_all = put(tr_all, out.trainables), put(opt_all, out.opt_state)
    return CohortRound(tr_all, opt_all, out.metrics, out.trainables['shared'], out.z, out.z_valid, public.ids)

  return round_fn


def make_generate(program: NodeProgram, mesh: Mesh, max_len: int) -> Callable:
  """Jitted greedy decoding of every stacked client's split."""
  gen = cohort_map(lambda tr, split, frozen: program.generate_split(tr, frozen, split, max_len), 2, mesh=mesh)
  return jax.jit(gen)


def init(cfg: ml_collections.ConfigDict, workdir: str | None = None, dataset: MultimodalDataset | None = None,
         log: Callable[[str], None] = print, cache_dir: str | None = None) -> tuple[Setup, State]:
  """Builds a federation from a validated config. workdir receives the tokenizer; pretrained
  backbones are cached under (cache_dir or workdir)/backbones. `dataset` replaces the config's
  data source (an in-memory MultimodalDataset)."""
  ds = dataset if dataset is not None else load_dataset(cfg.data)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
  bb = backbones.resolve(cfg, log=log)   # HF checkpoints read here, once each (ml_ecs/backbones/resolve.py)
  text = build_task_text(ds, cfg.text, f'{workdir}/tokenizer.json' if workdir and distributed.is_main() else None,
                         tokenizer=bb.tokenizer)
  mcfgs = bb.models                      # edge_model / server_model with the resolved backbones
  part = partition(ds, cfg.data)
  modalities = ds.modality_names
  shapes = {m: x.shape[1:] for m, x in ds.modalities.items()}
  mesh = client_mesh(cfg.mesh.num_devices)
  client_sharding, replicated = NamedSharding(mesh, P(CLIENT_AXIS)), NamedSharding(mesh, P())
  stages = amt.stages(cfg.method, cfg.train)
  optimizer = make_optimizer(cfg.train)
  m = cfg.method
  host = bool(cfg.train.get('host_state', False))
  if host and jax.process_count() > 1:   # host rows are not split over processes (yet)
    raise ValueError(f'train.host_state=True runs in one process; this run has {jax.process_count()} '
                     '(set train.host_state=False: each process then holds its own clients on its devices)')

  def model_fn(name, mods, enc, rngs):
    return MultimodalLM({k: shapes[k] for k in mods}, enc, modalities, mcfgs[name],
                        bb.vocab_size(name, text.tokenizer.vocab_size), rngs=rngs, **model_options(cfg))

  def program(fn, num_modalities):
    graphdef, _ = params.split_model(nnx.eval_shape(lambda: fn(nnx.Rngs(0))))
    return NodeProgram(graphdef, num_modalities, jnp.asarray(text.instr), jnp.asarray(text.instr_mask),
                       m.ccl if m.lambda_ccl > 0 else 'none', m.tau_ccl, m.tau_se_ccl, cfg.train.batch_size,
                       optimizer, zero_fill=bool(m.zero_fill), modality_dropout=float(m.modality_dropout),
                       ccl_anchor=m.ccl_anchor)

  # Frozen backbones: Hugging Face checkpoints, or pretrained (or cached); one copy per device.
  pretrain_info, frozen, placed = {}, {}, {}
  for name in backbones.MODELS:
    template = nnx.eval_shape(lambda: model_fn(name, modalities, {k: 'mlp' for k in modalities}, nnx.Rngs(0)))
    template = params.split_model(template)[1]['frozen']
    if bb.sources[name] != 'pretrained':
      frozen[name] = backbones.frozen_state(bb, name, template, replicated, placed)
      continue
    frozen[name], info = cached_backbone(name, cfg, text, template, cache_dir or workdir, bb.tokenizer_id)
    if info:
      pretrain_info[name] = info
      log(f"pretrained {name} backbone: LM loss {info['loss_first']:.2f} -> {info['loss_final']:.2f}")
  bb.weights.clear()   # the host copies of HF weights; the device copies are in `frozen`
  edge_frozen, server_frozen = distributed.replicate((frozen['edge_model'], frozen['server_model']), replicated)

  # Cohorts: stacked, padded, sharded on the client axis.
  ndev = mesh.size
  init_rng = jax.random.key(cfg.seed + 17)
  cohorts, cohort_states = [], []
  for k, clients in enumerate(part.cohorts()):
    n_real = len(clients)
    num_sampled = max(1, int(round(cfg.train.client_fraction * n_real)))
    num_selected = _round_up(num_sampled, ndev)
    n_pad = _round_up(n_real + num_selected - num_sampled, ndev)
    padded = list(clients) + [clients[0]] * (n_pad - n_real)
    fn = functools.partial(model_fn, 'edge_model', clients[0].modalities, dict(clients[0].encoder_types))
    prog = program(fn, len(clients[0].modalities))
    keys = _per_client_keys(jax.random.fold_in(init_rng, k), jnp.arange(n_pad))
    client_init = lambda key, fn=fn: sub(params.split_model(fn(nnx.Rngs(key)))[1], params.TRAINABLE)
    init_opt = jax.vmap(functools.partial(amt.init_opt_state, prog, stages))
    rows = distributed.local_rows(client_sharding, n_pad)   # this process builds only its own clients' data
    if host:   # built block by block straight into host arrays: the devices never hold the cohort
      block_init = jax.jit(lambda ks, f=client_init, o=init_opt: (lambda tr: NodeState(tr, o(tr)))(jax.vmap(f)(ks)),
                           out_shardings=client_sharding)
      st = host_init(block_init, keys, _round_up(min(n_pad, 256), ndev))
      trainables, opt_state = st.trainables, st.opt_state
    else:
      trainables = stack_init(fn, keys, client_sharding)
      opt_state = jax.jit(init_opt, out_shardings=client_sharding)(trainables)
    data = cohort_data(ds, text, padded, part.public_train_idx, cfg.eval.max_test_per_client,
                       cfg.data.label_fraction, cfg.data.public_labels, cfg.data.seed, rows=rows, host=host)
    if not host:
      data = dataclasses.replace(data, **{s: distributed.put_rows(getattr(data, s), client_sharding, n_pad)
                                          for s in ('train', 'test', 'public', 'val') if getattr(data, s) is not None})
    ids = np.array([c.client_id for c in clients] + [-1] * (n_pad - n_real))
    cohorts.append(CohortSetup(data, prog, ids, n_real, num_sampled, num_selected,
                               make_cohort_round(prog, stages, mesh, cfg.train.client_chunk, bool(m.communicate),
                                                 full=host or num_selected == n_pad),
                               make_generate(prog, mesh, cfg.text.answer_len),
                               faults.make_resync(client_init, functools.partial(amt.init_opt_state, prog, stages),
                                                  keys, client_sharding), host, rows))
    cohort_states.append(NodeState(trainables, opt_state))

  # Round-0 broadcast: every client starts from the same shared LoRA.
  # (jnp.array copies: a host row must not alias a device buffer that outlives in-place updates)
  global_shared = jax.tree.map(lambda x: jnp.array(x[0]), cohort_states[0].trainables['shared'])
  if m.communicate and host:   # in place, on the host
    for s_ in cohort_states:
      jax.tree.map(lambda h, g: h.__setitem__(slice(None), np.asarray(g)), s_.trainables['shared'], global_shared)
  elif m.communicate:
    cohort_states = [dataclasses.replace(s, trainables={
        **s.trainables, 'shared': jax.device_put(_broadcast_to_clients(global_shared, s.trainables['shared']),
                                                 client_sharding)}) for s in cohort_states]
  leaf_mod = mma.leaf_modalities(global_shared, modalities)

  # Server: one node with every modality, trained on the public split.
  server_fn = functools.partial(model_fn, 'server_model', modalities,
                                {k: cfg.data.encoders[k][0] for k in modalities})
  server_prog = program(server_fn, len(modalities))
  server_tr = jax.tree.map(lambda x: x[0], stack_init(server_fn, jax.random.key(cfg.seed + 29)[None]))
  server_opt = server_prog.init_opt(server_tr, stages.server)
  squeeze = lambda split: jax.tree.map(lambda x: x[0], split)
  public_train = squeeze(full_modality_split(ds, text, part.public_train_idx,
                                             label_fraction=cfg.data.server_label_fraction, label_seed=cfg.data.seed))
  public_test = squeeze(full_modality_split(ds, text, part.public_test_idx, cfg.eval.max_server_test))
  public_val = (squeeze(full_modality_split(ds, text, part.public_val_idx, cfg.eval.max_server_test))
                if len(part.public_val_idx) else None)
  server_tr, server_opt, public_train, public_test, public_val = distributed.replicate(
      (server_tr, server_opt, public_train, public_test, public_val), replicated)
  spec = stages.server

  # Frozen weights and data are arguments, not closure constants (which XLA would embed).
  @jax.jit
  def server_round(tr, opt, rng, targets, target_valid, frozen, public):
    ctx = {'frozen': frozen, 'targets': targets, 'target_valid': target_valid}
    tr, opt, metrics = server_prog.run_stage(tr, opt, public, rng, ctx, spec)
    z, _ = server_prog.encode_split(tr, frozen, public)
    return tr, opt, metrics, z

  server_z = jax.jit(lambda tr, fr, pub: server_prog.encode_split(tr, fr, pub)[0])(
      server_tr, server_frozen, public_train)

  # Accounting and MMA weights.
  leaf_bytes = [(mi, int(np.prod(x.shape)) * x.dtype.itemsize)
                for mi, x in zip(jax.tree.leaves(leaf_mod), jax.tree.leaves(global_shared))]
  frozen_bytes = params.count(edge_frozen)[1]
  acct_clients = []
  for c, s in zip(cohorts, cohort_states):
    model_bytes = params.count(jax.tree.map(lambda x: x[0], s.trainables))[1] + frozen_bytes
    mods_idx = [modalities.index(x) for x in c.data.modalities]
    acct_clients += [(spec_.client_id, mods_idx, len(spec_.public_idx), model_bytes)
                     for spec_ in c.data.clients[:c.num_real]]
  acct = communication.accounting(acct_clients, leaf_bytes, cfg.edge_model.d_z, jnp.dtype(jnp.float32).itemsize,
                                  params.count(server_tr)[1] + params.count(server_frozen)[1])
  num_samples = np.zeros(len(part.clients), np.int64)
  num_mods = np.zeros(len(part.clients), np.int64)
  has, observations = np.zeros((2, len(part.clients), len(modalities)), np.float32)
  for spec_ in part.clients:
    num_samples[spec_.client_id], num_mods[spec_.client_id] = len(spec_.train_idx), len(spec_.modalities)
    cols = [modalities.index(x) for x in spec_.modalities]
    has[spec_.client_id, cols] = 1.0
    observations[spec_.client_id, cols] = np.asarray(spec_.train_mask, np.float32).sum(0)
  weights = mma.client_weights(m.mma_backbone, num_samples, num_mods)

  setup = Setup(
      cfg=cfg, dataset=ds, text=text, partition=part, scorer=TextScorer(ds.descriptions), modalities=modalities,
      mesh=mesh, stages=stages, edge_frozen=edge_frozen, server_frozen=server_frozen, cohorts=tuple(cohorts),
      server_program=server_prog, public_train=public_train, public_test=public_test, public_val=public_val,
      leaf_mod=leaf_mod,
      weights=weights, modality_weights=mma.modality_weights(m.mma_modality, weights, has, observations),
      accounting=acct, pretrain_info=pretrain_info,
      aggregate_fn=jax.jit(functools.partial(robust.aggregate, leaf_mod=leaf_mod,
                                             modality_aware=m.mma_modality != 'samples', **robust.options(cfg))),
      targets_fn=jax.jit(se_ccl.se_ccl_targets, static_argnums=4),
      server_round_fn=server_round,
      server_generate_fn=jax.jit(lambda tr, fr, test: server_prog.generate_split(tr, fr, test, cfg.text.answer_len)),
      server_reliability_fn=jax.jit(server_prog.split_lm), backbones=bb.describe(), model_cfgs=mcfgs)
  round_, rng = jnp.zeros((), jnp.int32), jax.random.key_data(jax.random.key(cfg.seed))
  if jax.process_count() > 1:   # one global value for every process (and its checkpoint)
    round_, rng = distributed.replicate((round_, rng), replicated)
  state = State(cohorts=tuple(cohort_states), server=NodeState(server_tr, server_opt), global_shared=global_shared,
                server_z=server_z, round=round_, rng=rng)
  log(f'{len(part.clients)} clients in {len(cohorts)} cohorts ({cohort_layout(setup)}) on {mesh.size} device(s) '
      f'[{", ".join(sorted({d.platform for d in mesh.devices.flat}))}] of {jax.process_count()} process(es), '
      f'mesh {dict(mesh.shape)}; '
      f'method {cfg.method.name}')
  return setup, state


def cohort_layout(setup: Setup) -> str:
  """'accel+depth x2 (conv1d/mlp), ...' for logs."""
  parts = []
  for c in setup.cohorts:
    enc = '/'.join(t for _, t in c.data.clients[0].encoder_types)
    parts.append(f"{'+'.join(c.data.modalities)} x{c.num_real} ({enc})")
  return ', '.join(parts)


# ---------------------------------------------------------------------------- rounds
def sample_clients(cohort: CohortSetup, key: jax.Array) -> np.ndarray:
  """Sorted positions of the real clients a cohort trains this round (without replacement)."""
  return np.sort(np.asarray(jax.random.choice(key, cohort.num_real, (cohort.num_sampled,), replace=False)))


def run_round(setup: Setup, state: State) -> tuple[State, dict[str, Any]]:
  """One communication round; returns the new state and the round's training metrics.

  The cohorts' trainables and optimizer states of `state` are donated (consumed).
  Diverged clients are re-synced first, faults are drawn for the sampled clients, and the
  survivors' uploads are aggregated robustly (ml_ecs.core.faults, ml_ecs.aggregation.robust).
  """
  t0 = time.perf_counter()
  cfg = setup.cfg
  rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
  rng, server_key = jax.random.split(rng)
  fault_key = jax.random.fold_in(key, faults.FAULT_STREAM)
  outs, weights, presences, sampled, new_cohorts, row_ids = [], [], [], [], [], []
  resynced, dropped_ids, late_ids, diverged_ids, uploaded_ids = [], [], [], [], []
  metric_values: dict[str, list[np.ndarray]] = {}
  se_ctx, server_loss = se_ccl.round_context(setup, state)
  client_sharding = NamedSharding(setup.mesh, P(CLIENT_AXIS))
  # The broadcast inputs in one (replicated) sharding every round, so rounds reuse one compilation.
  global_in, z_in, se_ctx = jax.device_put((state.global_shared, state.server_z, se_ctx),
                                           NamedSharding(setup.mesh, P()))
  for k, (c, cs) in enumerate(zip(setup.cohorts, state.cohorts)):
    bad = ~(host_clients_finite(cs.trainables) if c.host else distributed.to_host(faults.clients_finite(cs.trainables)))
    bad[c.num_real:] = False
    if bad.any() and c.resync_fn is not None:   # diverged last round: re-sync from the global model
      if c.host:   # only the diverged rows, as one padded block
        pos = pad_positions(np.flatnonzero(bad), bucket(bad.sum(), setup.mesh.size))
        scatter_clients(cs, pos, c.resync_fn(*gather_clients((cs.trainables, cs.opt_state), pos, client_sharding),
                                             jnp.ones(len(pos), bool), state.global_shared, pos))
      else:
        cs = NodeState(*c.resync_fn(cs.trainables, cs.opt_state, jnp.asarray(bad), state.global_shared))
      resynced += c.client_ids[bad].tolist()
    ck = jax.random.fold_in(key, k)
    real = sample_clients(c, jax.random.fold_in(ck, 1))
    sel = np.concatenate([real, np.arange(c.num_real, c.num_real + c.num_selected - c.num_sampled)])
    if c.host:   # only the sampled block goes to the devices; it comes back into the host arrays
      out = c.round_fn(*gather_clients((cs.trainables, cs.opt_state, c.data.train, c.data.public), sel,
                                       client_sharding),
                       jnp.asarray(sel), ck, global_in, z_in, setup.edge_frozen, se_ctx)
      scatter_clients(cs, sel, NodeState(out.trainables, out.opt_state))
      new_cohorts.append(cs)
    else:
      out = c.round_fn(cs.trainables, cs.opt_state, c.data.train, c.data.public, jnp.asarray(sel), ck,
                       global_in, z_in, setup.edge_frozen, se_ctx)
      new_cohorts.append(NodeState(out.trainables, out.opt_state))
    outs.append(out)
    ids = c.client_ids[real]
    sampled.append(ids)
    factor, dropped, late = faults.draw_faults(jax.random.fold_in(fault_key, k), len(real), cfg.train)
    out_metrics, finite = distributed.to_host((out.metrics, mma.is_finite(out.shared)))   # from every process
    finite = finite[:len(real)].copy()
    for v in out_metrics.values():
      finite &= np.isfinite(v[:len(real)])
    dropped_ids += ids[dropped].tolist()
    late_ids += ids[late].tolist()
    diverged_ids += ids[~finite].tolist()
    up = factor > 0
    uploaded_ids += ids[up].tolist()
    row_ids.append(c.client_ids[sel])
    w = np.zeros(len(sel), np.float32)
    w[:len(real)] = setup.weights[ids] * factor
    weights.append(jnp.asarray(w))
    rows_ = mma.rows(setup.modality_weights, c.client_ids[real], len(sel))
    rows_[:len(real)] *= factor[:, None]          # dropped / late uploads weigh nothing (or less) here too
    presences.append(jnp.asarray(rows_))
    for name, v in out_metrics.items():
      if name.endswith('_ccl') and not name.endswith('se_ccl') and not c.program.has_ccl:
        continue   # a client with a single view has no CCL term
      metric_values.setdefault(name, []).append(v[:len(real)][up & finite])   # what the server hears
  sampled = np.concatenate(sampled)
  row_ids = np.concatenate(row_ids)
  metrics: dict[str, Any] = {}
  global_shared = state.global_shared
  if setup.communicate:
    agg = setup.aggregate_fn(tuple(o.shared for o in outs), tuple(weights), tuple(presences), global_shared,
                             jax.random.fold_in(key, faults.NOISE_STREAM))
    global_shared = agg.shared
    part, rejected, nonfinite, clipped, norms = distributed.to_host(
        (agg.participated, agg.rejected, agg.nonfinite, agg.clipped, agg.norms))
    metrics['mma/excluded'] = int(nonfinite.sum())
    metrics['agg/participants'] = int(part.sum())
    metrics['agg/rejected'] = int(rejected.sum())
    metrics['agg/rejected_ids'] = sorted(row_ids[rejected].tolist())
    metrics['agg/clipped'] = int(clipped.sum())
    norms = norms[part]
    metrics['agg/update_norm_median'] = float(np.median(norms)) if norms.size else 0.0
    metrics['agg/update_norm_max'] = float(norms.max()) if norms.size else 0.0
    # Representations count only from the clients whose LoRA update was accepted, weighted by reliability.
    bounds = np.cumsum([0] + [len(w) for w in weights])
    tw = tuple(w * jnp.asarray(part[a:b]) for w, a, b in zip(weights, bounds[:-1], bounds[1:]))
    up_weights = se_ccl.server_upload_weights(setup, state, outs, tw, server_loss)
    zs, dp = tuple(o.z for o in outs), cfg.dp
    if dp.enabled and dp.noise_representations:
      zs = tuple(robust.clip_representations(z, o.z_valid, dp.repr_clip_norm) for z, o in zip(zs, outs))
    targets, has_target = setup.targets_fn(zs, tuple(o.public_ids for o in outs), tuple(o.z_valid for o in outs),
                                           up_weights, setup.num_public)
    if dp.enabled and dp.noise_representations:
      targets = robust.noise_representation_targets(
          tuple(o.z_valid for o in outs), up_weights, tuple(o.public_ids for o in outs), setup.num_public,
          jax.random.fold_in(key, faults.NOISE_STREAM + 1), dp.repr_clip_norm, dp.repr_noise_multiplier, targets)
    if setup.sends_representations:
      metrics.update(se_ccl.server_metrics(up_weights, has_target, server_loss))
    if dp.enabled:
      metrics.update(privacy.round_metrics(dp, cfg.train.client_fraction, int(state.round) + 1))
  else:
    targets, has_target = state.server_z, jnp.zeros((setup.num_public,), bool)
  server_tr, server_opt, server_metrics, server_z = setup.server_round_fn(
      state.server.trainables, state.server.opt_state, server_key, targets, has_target.astype(jnp.float32),
      setup.server_frozen, setup.public_train)
  for name in sorted(metric_values):
    metrics[f'client/{name}'] = faults.finite_mean(metric_values[name])
  metrics.update({f'server/{k}': float(v) for k, v in server_metrics.items()})
  metrics['server/diverged'] = int(not all(np.isfinite(float(v)) for v in server_metrics.values()))
  metrics.update(setup.accounting.round_bytes(sampled, setup.communicate, setup.sends_representations))
  metrics['clients/sampled'] = int(len(sampled))
  metrics['clients/diverged_ids'] = sorted(diverged_ids)
  metrics['clients/resynced_ids'] = sorted(resynced)
  metrics['faults/dropped'] = len(dropped_ids)
  metrics['faults/late'] = len(late_ids)
  metrics['faults/survivors'] = len(uploaded_ids)
  jax.block_until_ready(server_z)
  new_state = State(cohorts=tuple(new_cohorts), server=NodeState(server_tr, server_opt), global_shared=global_shared,
                    server_z=server_z, round=state.round + 1, rng=jax.random.key_data(rng))
  metrics['round'] = int(new_state.round)
  metrics['time/round_s'] = time.perf_counter() - t0
  return new_state, metrics


def _eval_shares(setup: Setup) -> list[int]:
  """Clients each cohort decodes per evaluation: all, or with eval.clients_per_eval = n its share
  round(n * num_real / total), at least one."""
  n = int(setup.cfg.eval.get('clients_per_eval', 0) or 0)
  total = sum(c.num_real for c in setup.cohorts)
  if not n or n >= total:
    return [c.num_real for c in setup.cohorts]
  return [min(c.num_real, max(1, int(round(n * c.num_real / total)))) for c in setup.cohorts]


def eval_positions(setup: Setup, round_: int, full: bool = False) -> list[np.ndarray | None]:
  """Per cohort, the sorted positions of the real clients an evaluation decodes (None = all).

  eval.clients_per_eval = n > 0 (below the number of clients, and not `full`): each cohort's
  share (`_eval_shares`) drawn without replacement from (seed, round, cohort), so the same
  round always evaluates the same clients.
  """
  out: list[np.ndarray | None] = []
  for k, (c, n_k) in enumerate(zip(setup.cohorts, _eval_shares(setup))):
    if full or n_k >= c.num_real:
      out.append(None)
      continue
    rng = np.random.default_rng([int(setup.cfg.seed), int(round_), k, 31])
    out.append(np.sort(rng.choice(c.num_real, n_k, replace=False)))
  return out


def eval_blocks(setup: Setup, k: int, pos: np.ndarray | None) -> list[tuple[np.ndarray | None, np.ndarray]]:
  """(padded block, its real positions) pairs cohort k decodes for `pos` (None = every real client).

  A device-resident cohort decodes all its clients in one call (block None). Otherwise blocks have
  one bucketed size per cohort (`bucket` of its sampled share), so sampled evaluations of any
  round and a full evaluation in several blocks reuse one compiled decoder.
  """
  c = setup.cohorts[k]
  if pos is None and not c.host:
    return [(None, np.arange(c.num_real))]
  size = bucket(_eval_shares(setup)[k], setup.mesh.size)
  pos = np.arange(c.num_real) if pos is None else pos
  return [(pad_positions(pos[i:i + size], size), pos[i:i + size]) for i in range(0, len(pos), size)]


def host_clients_finite(trainables) -> np.ndarray:
  """[C] bool of host (numpy) stacked trainables: every leaf of client c is finite (no transfer)."""
  leaves = jax.tree.leaves(trainables)
  return np.all([np.isfinite(x.reshape(len(x), -1)).all(1) for x in leaves], axis=0)


def _score_clients(setup: Setup, trainables: Sequence[dict], split: str = 'test',
                   positions: Sequence[np.ndarray | None] | None = None, view: Callable | None = None
                   ) -> tuple[dict[str, dict[str, float]], list[int]]:
  """Scores of every real client's generations on its `split` ('test' or 'val'), given each cohort's
  trainables, and the ids of the clients left out because their weights are not finite.
  `positions[k]`: only these clients of cohort k, decoded in padded blocks (`eval_blocks`, one
  batched generate call each); `view` maps the (gathered) stacked trainables before decoding."""
  text, scorer = setup.text, setup.scorer
  per_client: dict[str, dict[str, float]] = {}
  diverged: list[int] = []   # non-finite clients: left out of every client mean (ml_ecs.core.faults)
  positions = positions or [None] * len(setup.cohorts)
  sharding = NamedSharding(setup.mesh, P(CLIENT_AXIS))
  for k, (c, tr_all, pos) in enumerate(zip(setup.cohorts, trainables, positions)):
    data_all, index_lists = c.data.eval_split(split)
    for block, real in eval_blocks(setup, k, pos):
      tr, data = (tr_all, data_all) if block is None else gather_clients((tr_all, data_all), block, sharding)
      tr = jax.device_put(view(tr), sharding) if view is not None else tr   # one sharding: one compilation
      toks, counts, labels, finite = distributed.to_host(   # every process scores every client
          (c.generate_fn(tr, data, setup.edge_frozen), data.count, data.labels, faults.clients_finite(tr)))
      for j, p in enumerate(real):
        spec = c.data.clients[p]
        if not finite[j]:
          diverged.append(int(spec.client_id))
          continue
        preds = text.tokenizer.decode(toks[j, :counts[j]])
        refs = [text.references[i] for i in index_lists[p][:counts[j]]]
        per_client[str(spec.client_id)] = scorer.score(preds, refs, labels[j, :counts[j]].tolist())
  return per_client, diverged


def server_predictions(setup: Setup, state: State, split: str = 'test') -> tuple[list[str], np.ndarray]:
  """The server's generated answers on its public test (or validation) split, and their dataset indices."""
  server_split, server_idx = ((setup.public_val, setup.partition.public_val_idx) if split == 'val'
                              else (setup.public_test, setup.partition.public_test_idx))
  toks = distributed.to_host(setup.server_generate_fn(state.server.trainables, setup.server_frozen, server_split))
  n = int(server_split.count)
  return setup.text.tokenizer.decode(toks[:n]), server_idx[:n]


def evaluate(setup: Setup, state: State, split: str = 'test', full: bool = False) -> dict[str, Any]:
  """ROUGE and accuracy of every client on its test split and of the server on the public test split
  (split='val': the validation splits cut for tuning; never the test data).

  client/*: the personalised models (what each client trains and uses); with communication
  also client/global_*: the global model, the aggregated shared LoRA in each client's model
  with the private LoRA off (`amt.global_view`). *_multi: multi-reference ROUGE-LSum.
  With eval.clients_per_eval the client scores cover a sample drawn per round (`full`: every
  client), and client/evaluated says how many clients they cover.
  """
  t0 = time.perf_counter()
  text, scorer = setup.text, setup.scorer
  positions = eval_positions(setup, int(state.round), full)
  per_client, diverged = _score_clients(setup, [cs.trainables for cs in state.cohorts], split, positions)
  gates = model_options(setup.cfg)['gates']
  per_global = _score_clients(setup, [cs.trainables for cs in state.cohorts], split, positions,
                              lambda tr: amt.global_view(tr, state.global_shared, gates))[0] \
      if setup.communicate else {}
  server_preds, idx = server_predictions(setup, state, split)
  server = scorer.score(server_preds, [text.references[i] for i in idx], setup.dataset.labels[idx].tolist())
  out: dict[str, Any] = {'round': int(state.round)}
  ids = sorted(per_client, key=int)
  for t in SCORE_NAMES:
    out[f'server/{t}'] = server[t]
    out[f'client/{t}_mean'] = float(np.mean([per_client[c][t] for c in ids])) if ids else float('nan')
    if per_global:
      gids = sorted(per_global, key=int)
      out[f'client/global_{t}_mean'] = float(np.mean([per_global[c][t] for c in gids])) if gids else float('nan')
  for t in ('rougeLsum', 'rougeLsum_multi', 'accuracy'):
    out[f'client/{t}'] = {c: per_client[c][t] for c in ids}
  out['client/diverged_ids'] = sorted(diverged)
  if setup.cfg.eval.get('clients_per_eval', 0):   # how many clients the client means cover
    out['client/evaluated'] = len(ids) + len(diverged)
  out['samples/server_prediction'] = server_preds[0] if server_preds else ''
  out['time/eval_s'] = time.perf_counter() - t0
  return out


# ---------------------------------------------------------------------------- descriptions
def model_summary(setup: Setup, state: State) -> dict[str, Any]:
  """Parameter counts of one edge model per cohort and of the server model (and with
  train.host_state the host bytes per client, `host_bytes_per_client`)."""
  edge = []
  for c, cs in zip(setup.cohorts, state.cohorts):
    parts = {**jax.tree.map(lambda x: x[0], cs.trainables), 'frozen': setup.edge_frozen}
    edge.append({'modalities': list(c.data.modalities), 'encoders': dict(c.data.clients[0].encoder_types),
                 'clients': c.num_real, 'params': params.count_parts(parts)})
  server = params.count_parts({**state.server.trainables, 'frozen': setup.server_frozen})
  out = {'edge_cohorts': edge, 'server': server, 'total_model_bytes': int(setup.accounting.total_model_bytes),
         'backbones': setup.backbones}
  if any(c.host for c in setup.cohorts):   # train.host_state: what one idle client costs the host
    out['host_bytes_per_client'] = host_bytes_per_client(setup, state)
  return out


def _addressable_bytes(tree) -> int:
  """Bytes of the shards of `tree` on this process's devices."""
  return int(sum(sh.data.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
                 for sh in x.addressable_shards))


def process_holdings(setup: Setup, state: State) -> dict[str, Any]:
  """What this process holds: its devices, the real clients whose data and state are on them (per
  cohort), and the bytes of client data, client state and replicated parts on its devices."""
  clients = [[int(i) for i in c.client_ids[c.rows] if i >= 0] for c in setup.cohorts]
  return {'process_index': jax.process_index(), 'process_count': jax.process_count(),
          'local_devices': [d.id for d in jax.local_devices()], 'clients': clients,
          'client_data_bytes': _addressable_bytes([(c.data.train, c.data.test, c.data.public, c.data.val)
                                                   for c in setup.cohorts]),
          'client_state_bytes': _addressable_bytes(state.cohorts),
          'replicated_bytes': _addressable_bytes((setup.edge_frozen, setup.server_frozen, state.server,
                                                  setup.public_train, setup.public_test, state.global_shared))}


def clients_info(setup: Setup) -> list[dict[str, Any]]:
  """One record per client: modalities, encoders, cohort, sample counts."""
  out = []
  for k, c in enumerate(setup.cohorts):
    for spec in c.data.clients[:c.num_real]:
      out.append({'client_id': int(spec.client_id), 'modalities': list(spec.modalities),
                  'encoders': dict(spec.encoder_types), 'cohort': k, 'num_train': int(len(spec.train_idx)),
                  'num_test': int(len(spec.test_idx)), 'num_public': int(len(spec.public_idx))})
  return sorted(out, key=lambda r: r['client_id'])


def answer_examples(setup: Setup, state: State, per_class: int = 1) -> list[dict[str, Any]]:
  """The server's generated answers for the first `per_class` public test samples of each class,
  beside their references."""
  preds, idx = server_predictions(setup, state)
  out, seen = [], {}
  for pred, i in zip(preds, idx):
    label = int(setup.dataset.labels[i])
    if seen.get(label, 0) < per_class:
      seen[label] = seen.get(label, 0) + 1
      out.append({'class': setup.dataset.class_names[label], 'reference': setup.text.references[i],
                  'generated': pred})
  return sorted(out, key=lambda r: r['class'])
