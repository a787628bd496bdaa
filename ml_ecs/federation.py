"""The ML-ECS round loop: vmapped client cohorts, MMA, server training, evaluation.

A round: the server sends its fused representations of the public split and the
aggregated shared LoRA down -> every sampled client (one jitted vmap per
cohort) runs a public stage (LM + SE-CCL alignment to the server's
representations, encoders frozen) and a private stage (LM + lambda_ccl * CCL)
-> clients upload shared LoRA and public fused representations -> MMA
aggregates the shared LoRA over all cohorts -> the server trains on the public
split (LM + CCL + alignment to the MMA-weighted client representations).

Method switches (config `method`) turn the same loop into the baselines and
ablations: no communication (local only), plain FedAvg weights, FedProx,
no CCL, no AMT (no private LoRA), no SE-CCL.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ml_ecs import aggregation, communication, params
from ml_ecs.cohort_data import CohortData, SplitArrays, cohort_data, full_modality_split
from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.data.loaders import load_dataset
from ml_ecs.data.partition import Partition, partition
from ml_ecs.evaluation import ROUGE_TYPES, TextScorer
from ml_ecs.models.multimodal import MultimodalLM
from ml_ecs.node import NodeProgram, StageSpec, make_optimizer, sub
from ml_ecs.pretrain import pretrain_backbone
from ml_ecs.text import TaskText, build_task_text


def method_flags(m: ml_collections.ConfigDict) -> dict[str, Any]:
  """Validated method switches."""
  if m.ccl not in ('gram', 'infonce', 'none'):
    raise ValueError(f"method.ccl must be 'gram', 'infonce' or 'none', got {m.ccl!r}")
  if m.mma_weights not in aggregation.WEIGHTINGS:
    raise ValueError(f'method.mma_weights must be one of {aggregation.WEIGHTINGS}, got {m.mma_weights!r}')
  if not 0.0 <= m.modality_dropout < 1.0:
    raise ValueError(f'method.modality_dropout must be in [0, 1), got {m.modality_dropout}')
  return dict(communicate=bool(m.communicate), se_ccl=bool(m.se_ccl), amt=bool(m.amt),
              ccl=m.ccl if m.lambda_ccl > 0 else 'none')


@dataclasses.dataclass
class Cohort:
  """Clients of one structure: their stacked state, data and compiled functions.

  The client axis holds the `num_real` clients first, then zero-weight padding
  clients (copies of client 0's data, id -1) up to a multiple of the device count;
  padding never reaches aggregation or metrics.
  """
  data: CohortData
  program: NodeProgram
  trainables: dict          # stacked [C_pad, ...], sharded on the client axis
  opt_state: dict           # {'public': ..., 'private': ...} stacked
  client_ids: np.ndarray    # [C_pad], -1 for padding
  num_real: int
  num_sampled: int          # real clients sampled per round
  num_selected: int         # sampled + padding, a multiple of the device count
  round_fn: Callable
  generate_fn: Callable


def _stack_init(model_fn: Callable[[nnx.Rngs], nnx.Module], keys: jax.Array, out_shardings=None) -> dict:
  """Trainable parts of one freshly initialised model per key, stacked (one compiled init)."""
  def init(key):
    return sub(params.split_model(model_fn(nnx.Rngs(key)))[1], params.TRAINABLE)
  return jax.jit(jax.vmap(init), out_shardings=out_shardings)(keys)


def _per_client_keys(key: jax.Array, positions: jax.Array) -> jax.Array:
  """One key per client position, independent of how many clients are stacked or padded."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(positions)


def _broadcast_to_clients(global_tree, stacked):
  """`global_tree` repeated along the leading client axis of `stacked` (same structure)."""
  return jax.tree.map(lambda g, x: jnp.broadcast_to(g, x.shape), global_tree, stacked)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


class Federation:
  """Holds the whole simulated federation and runs its rounds."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | None = None,
               dataset: MultimodalDataset | None = None, log: Callable[[str], None] = print,
               cache_dir: str | None = None):
    """workdir receives the tokenizer; pretrained backbones are cached under
    (cache_dir or workdir)/backbones, keyed by everything they depend on."""
    self.cfg = cfg
    self.log = log
    self.flags = method_flags(cfg.method)
    self.ds = dataset if dataset is not None else load_dataset(cfg.data)
    if workdir:
      os.makedirs(workdir, exist_ok=True)
    tok_path = os.path.join(workdir, 'tokenizer.json') if workdir else None
    self.text: TaskText = build_task_text(self.ds, cfg.text, tok_path)
    self.partition: Partition = partition(self.ds, cfg.data)
    self.scorer = TextScorer(self.ds.descriptions)
    self.modalities = self.ds.modality_names
    self.shapes = {m: x.shape[1:] for m, x in self.ds.modalities.items()}
    for name in ('edge_model', 'server_model'):
      need = cfg[name].prompt_len + cfg.text.instr_len + cfg.text.answer_len
      if need > cfg[name].backbone.max_len:
        raise ValueError(f'{name}.backbone.max_len={cfg[name].backbone.max_len} is shorter than '
                         f'prompt_len + text.instr_len + text.answer_len = {need}')
    self.pretrain_info = {}
    ndev = cfg.get('mesh', {}).get('num_devices', 0) or jax.device_count()
    if ndev > jax.device_count():
      raise ValueError(f'mesh.num_devices={ndev} but only {jax.device_count()} devices are visible')
    self.mesh = Mesh(np.array(jax.devices()[:ndev]), ('clients',))
    self.client_sharding = NamedSharding(self.mesh, P('clients'))
    self.replicated = NamedSharding(self.mesh, P())
    self.edge_frozen = self._backbone('edge_model', cache_dir or workdir)
    self.server_frozen = self._backbone('server_model', cache_dir or workdir)
    # Frozen backbones: one copy per device, shared by every client on it.
    self.edge_frozen, self.server_frozen = jax.device_put((self.edge_frozen, self.server_frozen), self.replicated)
    self.num_public = len(self.partition.public_train_idx)
    self.rng = jax.random.key(cfg.seed)

    # Stage specs (static): what each stage trains and optimises.
    m, t = cfg.method, cfg.train
    private_parts = tuple(p for p in params.TRAINABLE if self.flags['amt'] or p != 'private')
    public_parts = tuple(p for p in private_parts if p != 'encoders')
    self.public_spec = StageSpec(t.public_steps, public_parts,
                                 lambda_align=m.lambda_se if self.flags['se_ccl'] and self.flags['communicate'] else 0.0)
    self.private_spec = StageSpec(t.private_steps, private_parts,
                                  lambda_ccl=m.lambda_ccl if self.flags['ccl'] != 'none' else 0.0,
                                  fedprox_mu=m.fedprox_mu if self.flags['communicate'] else 0.0)
    self.server_spec = StageSpec(t.server_steps, params.TRAINABLE,
                                 lambda_ccl=m.lambda_ccl if self.flags['ccl'] != 'none' else 0.0,
                                 lambda_align=m.lambda_se if self.flags['se_ccl'] and self.flags['communicate'] else 0.0)
    self.optimizer = make_optimizer(t)
    self._build_cohorts()
    self._build_server()
    self._build_accounting()
    self.round = 0
    for name, info in self.pretrain_info.items():
      self.log(f"pretrained {name} backbone: LM loss {info['loss_first']:.2f} -> {info['loss_final']:.2f}")
    sizes = ', '.join(f"{'+'.join(c.data.modalities)} x{c.num_real}" for c in self.cohorts)
    self.log(f'{len(self.partition.clients)} clients in {len(self.cohorts)} cohorts ({sizes}) '
             f'on {self.mesh.size} device(s); method {cfg.method.name}')

  # ------------------------------------------------------------------ setup
  def _backbone(self, name: str, cache_dir: str | None) -> nnx.State:
    """Pretrained frozen backbone of `name`, cached in cache_dir/backbones/."""
    from flax import serialization
    mcfg = self.cfg[name]
    key = json.dumps([mcfg.backbone.to_dict(), mcfg.prompt_len, self.cfg.text.to_dict(), self.cfg.pretrain.to_dict(),
                      self.cfg.seed, self.cfg.data.name, self.cfg.data.path, name], sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, 'backbones', f'{name}-{digest}.msgpack') if cache_dir else None
    template = nnx.eval_shape(lambda: self._model(mcfg, self.modalities, {m: 'mlp' for m in self.modalities},
                                                  nnx.Rngs(0)))
    frozen_template = params.split_model(template)[1]['frozen']
    if path and os.path.exists(path):
      with open(path, 'rb') as f:
        pure = serialization.msgpack_restore(f.read())
    else:
      backbone_state, info = pretrain_backbone(mcfg.backbone, mcfg.prompt_len, self.text, self.cfg.pretrain,
                                               self.cfg.seed + (0 if name == 'edge_model' else 1))
      self.pretrain_info[name] = info
      pure = {'backbone': nnx.to_pure_dict(backbone_state)}
      if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + '.tmp'
        with open(tmp, 'wb') as f:
          f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, pure)))
        os.replace(tmp, path)
    expected = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(frozen_template))
    got = jax.tree.map(lambda x: tuple(np.shape(x)), pure)
    if got != expected:
      raise ValueError(f'backbone weights for {name} ({path or "pretrained"}) do not match {name}.backbone; '
                       'delete the cached file to retrain')
    nnx.replace_by_pure_dict(frozen_template, jax.tree.map(jnp.asarray, pure))
    return frozen_template

  def _model(self, mcfg, modalities, encoder_types, rngs):
    return MultimodalLM({m: self.shapes[m] for m in modalities}, encoder_types, self.modalities, mcfg,
                        self.text.tokenizer.vocab_size, rngs=rngs)

  def _program(self, graphdef, num_modalities: int) -> NodeProgram:
    m, t = self.cfg.method, self.cfg.train
    return NodeProgram(graphdef, num_modalities, jnp.asarray(self.text.instr), jnp.asarray(self.text.instr_mask),
                       self.flags['ccl'], m.tau_ccl, m.tau_se, t.batch_size, self.optimizer,
                       zero_fill=bool(m.zero_fill), modality_dropout=float(m.modality_dropout))

  def _build_cohorts(self) -> None:
    cfg = self.cfg
    self.cohorts: list[Cohort] = []
    init_rng = jax.random.key(cfg.seed + 17)
    ndev = self.mesh.size
    for k, clients in enumerate(self.partition.cohorts()):
      n_real = len(clients)
      num_sampled = max(1, int(round(cfg.train.client_fraction * n_real)))
      num_selected = _round_up(num_sampled, ndev)
      n_pad = _round_up(n_real + num_selected - num_sampled, ndev)
      padded = list(clients) + [clients[0]] * (n_pad - n_real)
      mods = clients[0].modalities
      enc = dict(clients[0].encoder_types)
      model_fn = functools.partial(self._model, cfg.edge_model, mods, enc)
      graphdef, _ = params.split_model(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
      program = self._program(graphdef, len(mods))
      keys = _per_client_keys(jax.random.fold_in(init_rng, k), jnp.arange(n_pad))
      trainables = _stack_init(model_fn, keys, self.client_sharding)
      init_opt = lambda tr, spec: jax.jit(jax.vmap(lambda t: program.init_opt(t, spec)),
                                          out_shardings=self.client_sharding)(tr)
      opt_state = {'public': init_opt(trainables, self.public_spec), 'private': init_opt(trainables, self.private_spec)}
      data = cohort_data(self.ds, self.text, padded, self.partition.public_train_idx, cfg.eval.max_test_per_client)
      data = dataclasses.replace(data, **{s: jax.device_put(getattr(data, s), self.client_sharding)
                                          for s in ('train', 'test', 'public')})
      ids = np.array([c.client_id for c in clients] + [-1] * (n_pad - n_real))
      self.cohorts.append(Cohort(data, program, trainables, opt_state, ids, n_real, num_sampled, num_selected,
                                 self._make_round_fn(program, full=num_selected == n_pad),
                                 self._make_generate_fn(program)))
    # Round-0 broadcast: every client starts from the same shared LoRA.
    self.global_shared = jax.tree.map(lambda x: x[0], self.cohorts[0].trainables['shared'])
    if self.flags['communicate']:
      for c in self.cohorts:
        c.trainables['shared'] = jax.device_put(
            _broadcast_to_clients(self.global_shared, c.trainables['shared']),
            self.client_sharding)
    self.leaf_mod = aggregation.leaf_modalities(self.global_shared, self.modalities)
    self._aggregate = jax.jit(functools.partial(aggregation.aggregate, leaf_mod=self.leaf_mod,
                                                modality_aware=self.cfg.method.mma_weights != 'fedavg'))
    self._aggregate_reps = jax.jit(aggregation.aggregate_representations, static_argnums=4)

  def _build_server(self) -> None:
    cfg = self.cfg
    enc_types = {m: cfg.data.encoders[m][0] for m in self.modalities}
    model_fn = functools.partial(self._model, cfg.server_model, self.modalities, enc_types)
    graphdef, _ = params.split_model(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
    self.server_program = self._program(graphdef, len(self.modalities))
    self.server_trainables = jax.tree.map(lambda x: x[0], _stack_init(model_fn, jax.random.key(cfg.seed + 29)[None]))
    self.server_opt = self.server_program.init_opt(self.server_trainables, self.server_spec)
    # The server is one node: its splits are kept without the client axis.
    squeeze = lambda split: jax.tree.map(lambda x: x[0], split)
    self.public_train = squeeze(full_modality_split(self.ds, self.text, self.partition.public_train_idx))
    self.public_test = squeeze(full_modality_split(self.ds, self.text, self.partition.public_test_idx,
                                                   cfg.eval.max_server_test))
    (self.server_trainables, self.server_opt, self.public_train, self.public_test) = jax.device_put(
        (self.server_trainables, self.server_opt, self.public_train, self.public_test), self.replicated)
    prog, spec = self.server_program, self.server_spec
    # Frozen weights and data are arguments, not closure constants (which XLA would embed).

    @jax.jit
    def server_round(tr, opt, rng, targets, target_valid, frozen, public):
      ctx = {'frozen': frozen, 'targets': targets, 'target_valid': target_valid}
      tr, opt, metrics = prog.run_stage(tr, opt, public, rng, ctx, spec)
      z, _ = prog.encode_split(tr, frozen, public)
      return tr, opt, metrics, z

    self._server_round = server_round
    self._server_encode = jax.jit(lambda tr, frozen, public: prog.encode_split(tr, frozen, public)[0])
    self._server_generate = jax.jit(lambda tr, frozen, test: prog.generate_split(tr, frozen, test, cfg.text.answer_len))
    self.server_z = self._server_encode(self.server_trainables, self.server_frozen, self.public_train)

  def _make_round_fn(self, program: NodeProgram, full: bool) -> Callable:
    """One jitted round of a cohort. `full`: every stacked client is selected (no gather/scatter)."""
    pub_spec, priv_spec = self.public_spec, self.private_spec
    communicate = self.flags['communicate']

    def one_client(tr, opt, train, public, key, ctx):
      k1, k2 = jax.random.split(key)
      metrics = {}
      if pub_spec.steps:
        tr, opt_pub, m1 = program.run_stage(tr, opt['public'], public, k1, ctx, pub_spec)
        opt = {**opt, 'public': opt_pub}
        metrics.update({f'public_{k}': v for k, v in m1.items()})
      if priv_spec.steps:
        tr, opt_priv, m2 = program.run_stage(tr, opt['private'], train, k2, ctx, priv_spec)
        opt = {**opt, 'private': opt_priv}
        metrics.update({f'private_{k}': v for k, v in m2.items()})
      z, valid = program.encode_split(tr, ctx['frozen'], public)
      return tr, opt, metrics, z, valid

    chunk = self.cfg.train.get('client_chunk', 0)
    if chunk:
      # lax.map over blocks of `chunk` vmapped clients: bounded working set, better cache use
      # (launch/bench.py picks k by measurement).
      def per_client(tr, opt, train, public, keys, ctx):
        return jax.lax.map(lambda a: one_client(*a, ctx), (tr, opt, train, public, keys), batch_size=chunk)
    else:
      per_client = jax.vmap(one_client, in_axes=(0, 0, 0, 0, 0, None))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def round_fn(tr_all, opt_all, train_all, public_all, sel, rng, global_shared, server_z, frozen):
      take = (lambda t: t) if full else (lambda t: jax.tree.map(lambda x: x[sel], t))
      tr, opt, train, public = take(tr_all), take(opt_all), take(train_all), take(public_all)
      if communicate:
        tr = {**tr, 'shared': _broadcast_to_clients(global_shared, tr['shared'])}
      ctx = {'frozen': frozen, 'targets': server_z, 'target_valid': jnp.ones(server_z.shape[:1]),
             'ref_shared': global_shared}
      keys = _per_client_keys(rng, sel)
      tr, opt, metrics, z, valid = self._per_device(per_client, 5)(tr, opt, train, public, keys, ctx)
      if full:
        return tr, opt, metrics, tr['shared'], z, valid, public.ids
      put = lambda all_, part: jax.tree.map(lambda f, p: f.at[sel].set(p), all_, part)
      return put(tr_all, tr), put(opt_all, opt), metrics, tr['shared'], z, valid, public.ids

    return round_fn

  def _per_device(self, f: Callable, num_client_args: int) -> Callable:
    """`f` (vmapped over clients) run by `shard_map`: each device updates its own block of
    clients with no cross-device traffic; trailing arguments are replicated. (Plain jit with
    NamedSharding inputs lets XLA all-gather the vmapped per-client conv kernels onto every
    device: measured slower than one device in launch/bench.py.)"""
    def wrapped(*args):
      specs = (P('clients'),) * num_client_args + (P(),) * (len(args) - num_client_args)
      return jax.shard_map(f, mesh=self.mesh, in_specs=specs, out_specs=P('clients'))(*args)
    return wrapped

  def _make_generate_fn(self, program: NodeProgram) -> Callable:
    max_len = self.cfg.text.answer_len
    gen = jax.vmap(lambda tr, split, frozen: program.generate_split(tr, frozen, split, max_len), in_axes=(0, 0, None))
    return jax.jit(self._per_device(gen, 2))

  def _build_accounting(self) -> None:
    n = len(self.partition.clients)
    self.num_samples = np.zeros(n, np.int64)
    self.num_mods = np.zeros(n, np.int64)
    self.shared_bytes = np.zeros(n, np.int64)
    self.reps_bytes = np.zeros(n, np.int64)
    itemsize = jnp.dtype(jnp.float32).itemsize
    leaf_bytes = [(m, int(np.prod(x.shape)) * x.dtype.itemsize)
                  for m, x in zip(jax.tree.leaves(self.leaf_mod), jax.tree.leaves(self.global_shared))]
    total_bytes = 0
    for cohort in self.cohorts:
      client_total = params.count(jax.tree.map(lambda x: x[0], cohort.trainables))[1] + params.count(self.edge_frozen)[1]
      mods_idx = [self.modalities.index(m) for m in cohort.data.modalities]
      for c in cohort.data.clients[:cohort.num_real]:
        i = c.client_id
        self.num_samples[i] = len(c.train_idx)
        self.num_mods[i] = len(c.modalities)
        self.shared_bytes[i] = sum(b for m, b in leaf_bytes if m < 0 or m in mods_idx)
        self.reps_bytes[i] = len(c.public_idx) * self.cfg.edge_model.d_z * itemsize
        total_bytes += client_total
    server_total = params.count(self.server_trainables)[1] + params.count(self.server_frozen)[1]
    self.total_model_bytes = total_bytes + server_total
    self.weights = aggregation.client_weights(self.cfg.method.mma_weights, self.num_samples, self.num_mods)

  # ------------------------------------------------------------------ rounds
  def _next_key(self) -> jax.Array:
    self.rng, key = jax.random.split(self.rng)
    return key

  def run_round(self) -> dict[str, Any]:
    """One communication round; returns its training metrics."""
    t0 = time.perf_counter()
    key = self._next_key()
    shared_list, w_list, pres_list, z_list, id_list, valid_list, metrics_list, sampled = [], [], [], [], [], [], [], []
    for k, c in enumerate(self.cohorts):
      ck = jax.random.fold_in(key, k)
      real = np.sort(np.asarray(jax.random.choice(jax.random.fold_in(ck, 1), c.num_real, (c.num_sampled,),
                                                  replace=False)))
      padding = np.arange(c.num_real, c.num_real + c.num_selected - c.num_sampled)
      sel = np.concatenate([real, padding])
      c.trainables, c.opt_state, metrics, shared, z, valid, ids = c.round_fn(
          c.trainables, c.opt_state, c.data.train, c.data.public, jnp.asarray(sel), ck,
          self.global_shared, self.server_z, self.edge_frozen)
      sampled.append(c.client_ids[real])
      shared_list.append(shared)
      w = np.zeros(len(sel), np.float32)
      w[:len(real)] = self.weights[c.client_ids[real]]
      w_list.append(jnp.asarray(w))
      pres = np.zeros((len(sel), len(self.modalities)), np.float32)
      pres[:len(real), [self.modalities.index(m) for m in c.data.modalities]] = 1.0
      pres_list.append(jnp.asarray(pres))
      z_list.append(z)
      id_list.append(ids)
      valid_list.append(valid)
      metrics_list.append({name: np.asarray(v)[:len(real)] for name, v in metrics.items()})
    sampled = np.concatenate(sampled)
    out: dict[str, Any] = {}
    if self.flags['communicate']:
      self.global_shared, excluded = self._aggregate(tuple(shared_list), tuple(w_list), tuple(pres_list),
                                                     self.global_shared)
      out['mma/excluded'] = int(excluded)
      targets, has_target = self._aggregate_reps(tuple(z_list), tuple(id_list), tuple(valid_list),
                                                 tuple(w_list), self.num_public)
    else:
      targets, has_target = self.server_z, jnp.zeros((self.num_public,), bool)
    self.server_trainables, self.server_opt, server_metrics, self.server_z = self._server_round(
        self.server_trainables, self.server_opt, self._next_key(), targets, has_target.astype(jnp.float32),
        self.server_frozen, self.public_train)
    # Client metrics: mean over sampled clients of every cohort.
    keys = sorted({k for m in metrics_list for k in m})
    for k in keys:
      vals = [m[k] for m in metrics_list if k in m]
      out[f'client/{k}'] = float(np.concatenate([v.reshape(-1) for v in vals]).mean())
    out.update({f'server/{k}': float(v) for k, v in server_metrics.items()})
    comm = communication.round_bytes(self.shared_bytes, self.reps_bytes, sampled,
                                     self.flags['communicate'], self.flags['communicate'] and self.flags['se_ccl'])
    out.update(comm)
    out['comm/ratio'] = (comm['comm/bytes_up'] + comm['comm/bytes_down']) / self.total_model_bytes
    out['clients/sampled'] = int(len(sampled))
    jax.block_until_ready(self.server_z)
    self.round += 1
    out['round'] = self.round
    out['time/round_s'] = time.perf_counter() - t0
    return out

  def evaluate(self) -> dict[str, Any]:
    """ROUGE and accuracy of every client on its test split and of the server on the public test split."""
    t0 = time.perf_counter()
    per_client: dict[str, dict[str, float]] = {}
    for c in self.cohorts:
      toks = np.asarray(c.generate_fn(c.trainables, c.data.test, self.edge_frozen))
      counts = np.asarray(c.data.test.count)
      labels = np.asarray(c.data.test.labels)
      for j, spec in enumerate(c.data.clients[:c.num_real]):
        preds = self.text.tokenizer.decode(toks[j, :counts[j]])
        idx = spec.test_idx[:counts[j]]
        refs = [self.text.references[i] for i in idx]
        per_client[str(spec.client_id)] = self.scorer.score(preds, refs, labels[j, :counts[j]].tolist())
    toks = np.asarray(self._server_generate(self.server_trainables, self.server_frozen, self.public_test))
    n = int(self.public_test.count)
    idx = self.partition.public_test_idx[:n]
    server_preds = self.text.tokenizer.decode(toks[:n])
    server = self.scorer.score(server_preds, [self.text.references[i] for i in idx],
                               self.ds.labels[idx].tolist())
    out: dict[str, Any] = {'round': self.round}
    for t in ROUGE_TYPES + ('accuracy',):
      out[f'server/{t}'] = server[t]
      vals = [per_client[c][t] for c in sorted(per_client, key=int)]
      out[f'client/{t}_mean'] = float(np.mean(vals))
    out['client/rougeLsum'] = {c: per_client[c]['rougeLsum'] for c in sorted(per_client, key=int)}
    out['client/accuracy'] = {c: per_client[c]['accuracy'] for c in sorted(per_client, key=int)}
    out['samples/server_prediction'] = server_preds[0] if server_preds else ''
    out['time/eval_s'] = time.perf_counter() - t0
    return out

  def state(self) -> dict[str, Any]:
    """Everything that changes during training, as a pytree of arrays (for checkpoints)."""
    return {
        'round': jnp.asarray(self.round),
        'global_shared': self.global_shared,
        'server_z': self.server_z,
        'server': {'trainables': self.server_trainables, 'opt_state': self.server_opt},
        'cohorts': [{'trainables': c.trainables, 'opt_state': c.opt_state} for c in self.cohorts],
        'rng': jax.random.key_data(self.rng),
    }

  def load_state(self, state: dict[str, Any]) -> None:
    """Inverse of `state`."""
    self.round = int(state['round'])
    self.global_shared = state['global_shared']
    self.server_z = state['server_z']
    self.server_trainables = state['server']['trainables']
    self.server_opt = state['server']['opt_state']
    for c, s in zip(self.cohorts, state['cohorts']):
      c.trainables, c.opt_state = s['trainables'], s['opt_state']
    self.rng = jax.random.wrap_key_data(state['rng'])

  def model_summary(self) -> dict[str, Any]:
    """Parameter counts of one edge model per cohort and of the server model."""
    edge = []
    for c in self.cohorts:
      parts = {**jax.tree.map(lambda x: x[0], c.trainables), 'frozen': self.edge_frozen}
      edge.append({'modalities': list(c.data.modalities), 'encoders': dict(c.data.clients[0].encoder_types),
                   'clients': c.num_real, 'params': params.count_parts(parts)})
    server = params.count_parts({**self.server_trainables, 'frozen': self.server_frozen})
    return {'edge_cohorts': edge, 'server': server, 'total_model_bytes': int(self.total_model_bytes)}
