"""Builds a federation from a validated config: `init` -> (Setup, State).

Cohorts of same-structure clients are stacked on a leading client axis, padded and sharded over the
client mesh; the frozen backbones are placed once per device; each cohort gets its jitted round
(the method's client update lifted by `cohort_map`) and decoder; the server gets its jitted stage.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ml_ecs.aggregation import robust
from ml_ecs.algorithms import registry
from ml_ecs.algorithms.base import Algorithm
from ml_ecs.algorithms.ml_ecs import amt, mma, se_ccl
from ml_ecs.backbones import resolve as backbones
from ml_ecs.backbones.pretrain import cached_backbone
from ml_ecs.core import autotune, communication, distributed, faults
from ml_ecs.core.client_store import broadcast_to_clients, first_row, host_init, per_client_keys, round_up
from ml_ecs.core.cohort_map import CLIENT_AXIS, RUN_AXIS, client_devices, cohort_map
from ml_ecs.core.context import RoundContext
from ml_ecs.core.describe import cohort_layout
from ml_ecs.core.node import NodeProgram, make_optimizer, sub
from ml_ecs.core.sampling import sampled_count
from ml_ecs.core.scoring import TextScorer
from ml_ecs.core.setup import CohortSetup, Setup
from ml_ecs.core.state import CohortRound, NodeState, State
from ml_ecs.data.cohort_data import cohort_data, full_modality_split, holdout_split
from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.data.loaders import load_dataset
from ml_ecs.data.partition import partition
from ml_ecs.data.text import build_task_text
from ml_ecs.models import params
from ml_ecs.models.keys import KeyStream
from ml_ecs.models.conv import CONV_IMPLS
from ml_ecs.models.multimodal import MultimodalLM, node_options


def stack_init_fn(model_fn: Callable[..., nnx.Module], out_shardings=None) -> Callable[..., dict]:
  """The compiled init of `stack_init`: (keys [n], **kwargs) -> the trainable parts of one fresh model per key,
  `model_fn(KeyStream(key), **kwargs)`, stacked; `kwargs` (traced, the same for every key) are what the
  model's init reads besides its key, e.g. the training seed of the shared modules (`shared_seed`)."""
  def init(keys, **kwargs):
    return jax.vmap(lambda key: sub(params.split_model(model_fn(KeyStream(key), **kwargs))[1], params.TRAINABLE))(keys)
  return jax.jit(init, out_shardings=out_shardings)


def stack_init(model_fn: Callable[[KeyStream], nnx.Module], keys: jax.Array, out_shardings=None) -> dict:
  """Trainable parts of one freshly initialised model per key, stacked (one compiled init)."""
  return stack_init_fn(model_fn, out_shardings)(keys)


def client_mesh(num_devices: int = 0, run_devices: int = 1) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (0 = all) with the client axis. With several
  processes it spans every process's devices, in process order, so each holds a contiguous block.
  `run_devices` > 1 (a program of many runs, ml_ecs.core.runs): a 2-D mesh, its run axis over
  `run_devices` of them and the client axis over the rest."""
  n = num_devices or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f'mesh.num_devices={n} but only {jax.device_count()} devices are visible')
  if jax.process_count() > 1 and n != jax.device_count():
    raise ValueError(f'mesh.num_devices={n}: with {jax.process_count()} processes the client mesh spans all '
                     f'{jax.device_count()} devices (set 0)')
  if run_devices < 1 or n % run_devices:
    raise ValueError(f'run_devices={run_devices}: expected a divisor of the mesh\'s {n} device(s)')
  devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))[:n])
  if run_devices == 1:
    return Mesh(devices, (CLIENT_AXIS,))
  return Mesh(devices.reshape(run_devices, n // run_devices), (RUN_AXIS, CLIENT_AXIS))


def make_cohort_round(algorithm: Algorithm, program: NodeProgram, stages: amt.Stages, mesh: Mesh, chunk: int,
                      communicate: bool, full: bool) -> Callable[..., CohortRound]:
  """One jitted round of a cohort: broadcast -> the method's client updates (cohort_map) -> uploads.

  `full`: every stacked client is selected (no gather/scatter). Trainables and optimizer
  states are donated.
  """
  update = cohort_map(functools.partial(algorithm.client_update, program, stages), 5, chunk=chunk, mesh=mesh)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def round_fn(tr_all, opt_all, train_all, public_all, sel, rng, global_shared, server_z, frozen,
               alignment=None, holdout=None) -> CohortRound:
    take = (lambda t: t) if full else (lambda t: jax.tree.map(lambda x: x[sel], t))
    tr, opt, train, public = take(tr_all), take(opt_all), take(train_all), take(public_all)
    if communicate:
      tr = {**tr, 'shared': broadcast_to_clients(global_shared, tr['shared'])}
    ctx = RoundContext(frozen, server_z, jnp.ones(server_z.shape[:1]), global_shared, alignment, holdout)
    out = update(tr, opt, train, public, per_client_keys(rng, sel), ctx)
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
         log: Callable[[str], None] = print, cache_dir: str | None = None,
         recorded: dict | None = None, hparams_in_state: bool = False,
         backbone_cache: str | None = None, jit_cache: dict | None = None, run_devices: int = 1
         ) -> tuple[Setup, State]:
  """Builds a federation from a validated config. workdir receives the tokenizer; pretrained
  backbones are cached under (cache_dir or workdir)/backbones, and also under backbone_cache/backbones
  when given (a folder shared by later runs: ml_ecs.backbones.pretrain.cached_backbone). `dataset` replaces the config's
  data source (an in-memory MultimodalDataset). `recorded`: the execution choices of this run's first
  process (`Setup.execution`, model_summary.json), made again as they were instead of measured.
  `hparams_in_state`: learning rates and the loss weights and temperatures are optimizer state, not
  program constants (`node.make_optimizer`; federations on a run axis, ml_ecs.core.runs). `jit_cache`: a dict
  shared by builds whose configs differ at most in `ml_ecs.core.runs.RUN_FIELDS` (runs.check_configs): the
  models' traced inits and graph definitions, keyed by everything they depend on, so a later build traces
  only what its seeds change (measured: most of a later run's setup). `run_devices`: the mesh's run axis
  (`client_mesh`; programs of many runs only)."""
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
  mesh = client_mesh(cfg.mesh.num_devices, run_devices)
  client_sharding, replicated = NamedSharding(mesh, P(CLIENT_AXIS)), NamedSharding(mesh, P())
  stages = amt.stages(cfg.method, cfg.train, hparams_in_state)
  algorithm = registry.build(cfg)
  optimizer = make_optimizer(cfg.train, lr_in_state=hparams_in_state)
  m = cfg.method
  host = bool(cfg.train.get('host_state', False))
  if host and jax.process_count() > 1:   # host rows are not split over processes (yet)
    raise ValueError(f'train.host_state=True runs in one process; this run has {jax.process_count()} '
                     '(set train.host_state=False: each process then holds its own clients on its devices)')

  def model_fn(name, mods, enc, rngs, conv_impl='xla', shared_seed=None):   # the server's: the same for every method
    options = node_options(cfg, name)
    if shared_seed is not None:   # a traced seed: one compiled init for every training seed (runs.init)
      options['shared_seed'] = shared_seed
    return MultimodalLM({k: shapes[k] for k in mods}, enc, modalities, mcfgs[name],
                        bb.vocab_size(name, text.tokenizer.vocab_size), rngs=rngs, conv_impl=conv_impl, **options)

  execution = {}   # measured execution choices per node structure (model_summary.json 'execution')

  def choose_conv(name, label, enc, clients):   # train.conv_impl, measured per cohort with 'auto'
    setting = cfg.train.get('conv_impl', 'xla')
    before = (recorded or {}).get(label, {}).get('conv_impl')
    if setting == 'auto' and before in CONV_IMPLS:   # a resumed run computes as its first process did
      impl, record, extra = before, None, {'recorded': True}
    else:
      impl, record = autotune.conv_impl(setting, enc, shapes, mcfgs[name].encoder_width, mcfgs[name].d_enc, clients,
                                        cfg.train.batch_size, autotune.cache_path())
      extra = {'autotune': record} if record else {}
    impl = CONV_IMPLS[distributed.from_main(CONV_IMPLS.index(impl))]   # one program on every process
    execution[label] = {'conv_impl': impl, **extra}
    if record:
      log(f"{label}: convolutions as {impl} ({', '.join(f'{k} {v * 1e3:.1f} ms' for k, v in record['seconds'].items())}"
          f"{', cached' if record['cached'] else ''})")
    return impl

  traced = jit_cache if jit_cache is not None else {}

  def cached(key, make):   # the traced piece `key`: made once per jit_cache, then reused
    if key not in traced:
      traced[key] = make()
    return traced[key]

  def node_key(name, mods, enc, conv_impl):   # all a node model's graph and init depend on besides its rng and seed
    options = {k: v for k, v in node_options(cfg, name).items() if k != 'shared_seed'}   # a traced init argument
    return (name, tuple(mods), tuple(sorted(enc.items())), conv_impl, tuple(sorted(options.items())),
            tuple(sorted((k, tuple(v)) for k, v in shapes.items())), bb.vocab_size(name, text.tokenizer.vocab_size))

  def program(fn, num_modalities, key):
    graphdef = cached(('graph',) + key, lambda: params.split_model(nnx.eval_shape(lambda: fn(KeyStream(0))))[0])
    return NodeProgram(graphdef, num_modalities, jax.device_put(text.instr), jax.device_put(text.instr_mask),
                       m.ccl if m.lambda_ccl > 0 else 'none', m.tau_ccl, m.tau_se_ccl, cfg.train.batch_size,
                       optimizer, ccl_anchor=m.ccl_anchor, input_view=algorithm.input_view,
                       batch_view=algorithm.batch_view)

  # Frozen backbones: Hugging Face checkpoints, or pretrained (or cached); one copy per device.
  pretrain_info, frozen, placed = {}, {}, {}
  for name in backbones.MODELS:
    new_model = lambda rngs, name=name: model_fn(name, modalities, {k: 'mlp' for k in modalities}, rngs)
    if bb.sources[name].startswith(backbones.RANDOM):   # an architecture with random weights, no pretraining
      frozen[name] = jax.jit(lambda: params.split_model(new_model(KeyStream(cfg.seed + 41)))[1]['frozen'])()
      continue
    template = cached(('template',) + node_key(name, modalities, {k: 'mlp' for k in modalities}, 'xla'),
                      lambda: params.split_model(nnx.eval_shape(lambda: new_model(KeyStream(0))))[1]['frozen'])
    if bb.sources[name] != 'pretrained':
      frozen[name] = backbones.frozen_state(bb, name, template, replicated, placed)
      continue
    frozen[name], info = cached_backbone(name, cfg, text, template, cache_dir or workdir, bb.tokenizer_id,
                                          backbone_cache)
    if info:
      pretrain_info[name] = info
      log(f"pretrained {name} backbone: LM loss {info['loss_first']:.2f} -> {info['loss_final']:.2f}")
  bb.weights.clear()   # the host copies of HF weights; the device copies are in `frozen`
  frozen = {name: params.store_frozen(f, cfg[name].backbone.frozen_dtype) for name, f in frozen.items()}
  edge_frozen, server_frozen = distributed.replicate((frozen['edge_model'], frozen['server_model']), replicated)

  # The models' compiled inits take the training seed (of the shared modules' init) as an argument.
  shared_seed = jnp.asarray(int(cfg.seed), jnp.int32)

  # Cohorts: stacked, padded, sharded on the client axis.
  ndev = client_devices(mesh)
  init_rng = jax.random.key(cfg.seed + 17)
  cohorts, cohort_states = [], []
  for k, clients in enumerate(part.cohorts()):
    n_real = len(clients)
    num_sampled = sampled_count(cfg.train.client_fraction, n_real)
    num_selected = round_up(num_sampled, ndev)
    n_pad = round_up(n_real + num_selected - num_sampled, ndev)
    padded = list(clients) + [clients[0]] * (n_pad - n_real)
    enc = dict(clients[0].encoder_types)
    block = min(cfg.train.client_chunk or num_selected, max(num_selected // ndev, 1))   # clients one vmap runs
    conv = choose_conv('edge_model', f'cohort {k}', enc, block)
    fn = functools.partial(model_fn, 'edge_model', clients[0].modalities, enc, conv_impl=conv)
    node = node_key('edge_model', clients[0].modalities, enc, conv)
    prog = program(fn, len(clients[0].modalities), node)
    keys = per_client_keys(jax.random.fold_in(init_rng, k), jnp.arange(n_pad))
    client_init = lambda key, fn=fn: sub(params.split_model(fn(KeyStream(key)))[1], params.TRAINABLE)
    init_opt = jax.vmap(functools.partial(algorithm.init_client_state, prog, stages))
    rows = distributed.local_rows(client_sharding, n_pad)   # this process builds only its own clients' data
    if host:   # built block by block straight into host arrays: the devices never hold the cohort
      block_init = jax.jit(lambda ks, f=client_init, o=init_opt: (lambda tr: NodeState(tr, o(tr)))(jax.vmap(f)(ks)),
                           out_shardings=client_sharding)
      st = host_init(block_init, keys, round_up(min(n_pad, 256), ndev))
      trainables, opt_state = st.trainables, st.opt_state
    else:
      trainables = cached(('init',) + node, lambda: stack_init_fn(fn, client_sharding))(keys, shared_seed=shared_seed)
      opt_state = jax.jit(init_opt, out_shardings=client_sharding)(trainables)
    data = cohort_data(ds, text, padded, part.public_train_idx, cfg.eval.max_test_per_client,
                       cfg.data.label_fraction, cfg.data.public_labels, cfg.data.seed, rows=rows, host=host)
    if not host:
      data = dataclasses.replace(data, **{s: distributed.put_rows(getattr(data, s), client_sharding, n_pad)
                                          for s in ('train', 'test', 'public', 'val') if getattr(data, s) is not None})
    ids = np.array([c.client_id for c in clients] + [-1] * (n_pad - n_real))
    holdout = (distributed.replicate(holdout_split(ds, text, clients[0].modalities, part.public_holdout_idx,
                                                   cfg.eval.max_server_test), replicated)
               if len(part.public_holdout_idx) else None)
    cohorts.append(CohortSetup(data, prog, ids, n_real, num_sampled, num_selected,
                               make_cohort_round(algorithm, prog, stages, mesh, cfg.train.client_chunk,
                                                 bool(m.communicate), full=host or num_selected == n_pad),
                               make_generate(prog, mesh, cfg.text.answer_len),
                               faults.make_resync(client_init, functools.partial(algorithm.init_client_state, prog, stages),
                                                  keys, client_sharding), host, rows, holdout))
    cohort_states.append(NodeState(trainables, opt_state))

  # Round-0 broadcast: every client starts from the same shared LoRA (new buffers: a host row must not
  # alias a device buffer that outlives in-place updates).
  global_shared = first_row(cohort_states[0].trainables['shared'])
  if m.communicate and host:   # in place, on the host
    for s_ in cohort_states:
      jax.tree.map(lambda h, g: h.__setitem__(slice(None), np.asarray(g)), s_.trainables['shared'], global_shared)
  elif m.communicate:
    cohort_states = [dataclasses.replace(s, trainables={
        **s.trainables, 'shared': jax.jit(broadcast_to_clients, out_shardings=client_sharding)(
            global_shared, s.trainables['shared'])}) for s in cohort_states]
  leaf_mod = mma.leaf_modalities(global_shared, modalities)

  # Server: one node with every modality, trained on the public split.
  server_enc = {k: cfg.data.encoders[k][0] for k in modalities}
  server_conv = choose_conv('server_model', 'server', server_enc, 1)
  server_fn = functools.partial(model_fn, 'server_model', modalities, server_enc, conv_impl=server_conv)
  server_node = node_key('server_model', modalities, server_enc, server_conv)
  server_prog = program(server_fn, len(modalities), server_node)
  server_tr = first_row(cached(('init',) + server_node, lambda: stack_init_fn(server_fn))(
      jax.random.key(cfg.seed + 29)[None], shared_seed=shared_seed))
  server_opt = jax.jit(functools.partial(server_prog.init_opt, spec=stages.server))(server_tr)
  public_split = lambda idx, **kw: first_row(full_modality_split(ds, text, idx, host=True, **kw))   # unstacked
  public_train = public_split(part.public_train_idx, label_fraction=cfg.data.server_label_fraction,
                              label_seed=cfg.data.seed)
  public_test = public_split(part.public_test_idx, max_len=cfg.eval.max_server_test)
  public_val = (public_split(part.public_val_idx, max_len=cfg.eval.max_server_test)
                if len(part.public_val_idx) else None)
  public_holdout = (holdout_split(ds, text, modalities, part.public_holdout_idx, cfg.eval.max_server_test)
                    if len(part.public_holdout_idx) else None)
  server_tr, server_opt, public_train, public_test, public_val, public_holdout = distributed.replicate(
      (server_tr, server_opt, public_train, public_test, public_val, public_holdout), replicated)
  spec = stages.server

  # Frozen weights and data are arguments, not closure constants (which XLA would embed).
  @jax.jit
  def server_round(tr, opt, rng, targets, target_valid, frozen, public):
    ctx = RoundContext(frozen, targets, target_valid)
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
    model_bytes = params.count(params.row_shapes(s.trainables))[1] + frozen_bytes
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
      server_reliability_fn=jax.jit(server_prog.split_lm), backbones=bb.describe(), model_cfgs=mcfgs,
      algorithm=algorithm, public_holdout=public_holdout, execution=execution)
  round_, rng = jnp.zeros((), jnp.int32), jax.random.key_data(jax.random.key(cfg.seed))
  if jax.process_count() > 1:   # one global value for every process (and its checkpoint)
    round_, rng = distributed.replicate((round_, rng), replicated)
  state = State(cohorts=tuple(cohort_states), server=NodeState(server_tr, server_opt), global_shared=global_shared,
                server_z=server_z, round=round_, rng=rng, algorithm=algorithm.init_state(global_shared))
  log(f'{len(part.clients)} clients in {len(cohorts)} cohorts ({cohort_layout(setup)}) on {mesh.size} device(s) '
      f'[{", ".join(sorted({d.platform for d in mesh.devices.flat}))}] of {jax.process_count()} process(es), '
      f'mesh {dict(mesh.shape)}; '
      f'method {cfg.method.name}')
  return setup, state
