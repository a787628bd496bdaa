"""Pure functions of one node (edge client or server) over its trainable pytree.

A node's trainables are {'shared', 'private', 'encoders', 'connector'} states of
`ml_ecs.models.params`; the frozen backbone comes in separately (once, unstacked, when a
cohort is vmapped). A *stage* is a number of local optimizer steps on batches
drawn from one split with a configurable objective:

  loss = LM (labelled samples only: answer_mask is zero on unlabelled ones)
            + lambda_ccl * CCL(text anchor, projected modality embeddings)  (ml_ecs.losses.ccl)
            + lambda_se_ccl * InfoNCE(head(z), targets[sample id])          (ml_ecs.algorithms.ml_ecs.se_ccl)
            + mu / 2 * ||shared - reference shared||^2                      (FedProx)

Each stage has its own optimizer (`StageSpec.optimizer`, `make_optimizer`), with a
constant or warm-up + cosine learning rate over that stage's total local steps.

Which stages a client and the server run is AMT's business (ml_ecs.algorithms.ml_ecs.amt).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ml_ecs.models import params
from ml_ecs.core.context import RoundContext
from ml_ecs.data.cohort_data import SplitArrays
from ml_ecs.losses.ccl import ccl_anchors, ccl_loss
from ml_ecs.losses.lm import lm_loss
from ml_ecs.losses.se_ccl import se_ccl_loss

Trainables = dict[str, nnx.State]


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """Static description of a local training stage."""
  steps: int
  parts: tuple[str, ...]          # trainable parts updated in this stage
  lambda_ccl: float = 0.0
  lambda_se_ccl: float = 0.0
  fedprox_mu: float = 0.0
  optimizer: Any = None           # this stage's optimizer; None = the program's
  reliability: bool = False       # SE-CCL: align only to a server at least as reliable (ml_ecs.algorithms.ml_ecs.se_ccl)
  learning_rate: float | None = None   # the (peak) rate of `optimizer` when it is not the program's (a record)


LR_SCHEDULES = ('constant', 'warmup_cosine')


def learning_rate(cfg: ml_collections.ConfigDict, total_steps: int = 0):
  """`train.learning_rate`, or with `train.lr_schedule = 'warmup_cosine'` a linear warm-up from 0
  over `train.warmup_steps` then cosine decay to 0 at `total_steps` (an optimizer's step count)."""
  if cfg.get('lr_schedule', 'constant') == 'constant' or total_steps <= 0:
    return cfg.learning_rate
  warmup = min(int(cfg.get('warmup_steps', 0)), total_steps - 1)
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, total_steps, end_value=0.0)


# The continuous hyperparameters of a training step that can be state (`make_optimizer(loss_hparams=...)`): runs
# of one program (ml_ecs.core.runs) may differ in them; whether a term is on (its weight > 0) stays static.
# The loss's weights and temperatures, and the rate at which a method's batch view drops modalities (the
# multimodal baseline's ModDrop), which is state only where it is on (> 0): a program without it keeps the
# optimizer state it had before the rate became state, so its checkpoints still restore.
LOSS_HPARAMS = ('lambda_ccl', 'tau_ccl', 'lambda_se_ccl', 'tau_se_ccl', 'fedprox_mu', 'modality_dropout')
ONLY_WHERE_ON = ('modality_dropout',)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int = 0, lr_in_state: bool = False,
                   loss_hparams: dict[str, float] | None = None) -> optax.GradientTransformation:
  """Clipped AdamW with the configured learning rate (schedule over `total_steps`).

  `lr_in_state`: the (peak) rate is an array in the optimizer state (`optax.inject_hyperparams`), not a
  constant of the program, so federations that differ only in it run one compiled program
  (ml_ecs.core.runs); the schedule's shape stays static. `loss_hparams` ({name in LOSS_HPARAMS: value},
  with `lr_in_state`) ride along in the same state's `hyperparams`, where `NodeProgram.run_stage` reads
  them instead of the program's constants."""
  if not lr_in_state:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(learning_rate(cfg, total_steps), weight_decay=cfg.weight_decay))
  unit = learning_rate(ml_collections.ConfigDict({**cfg.to_dict(), 'learning_rate': 1.0}), total_steps)

  # Called with the state's values (traced) at every update. inject_hyperparams keeps in the state the
  # numeric arguments of the factory's signature, so the loss hyperparameters are named (None: not given);
  # the loss reads them (`state_hparams`), the optimizer does not.
  def factory(learning_rate, lambda_ccl=None, tau_ccl=None, lambda_se_ccl=None, tau_se_ccl=None, fedprox_mu=None,
              modality_dropout=None):
    del lambda_ccl, tau_ccl, lambda_se_ccl, tau_se_ccl, fedprox_mu, modality_dropout
    rate = (lambda count: learning_rate * unit(count)) if callable(unit) else learning_rate
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(rate, weight_decay=cfg.weight_decay))

  unknown = set(loss_hparams or {}) - set(LOSS_HPARAMS)
  if unknown:
    raise ValueError(f'loss_hparams: {sorted(unknown)} are not among {LOSS_HPARAMS}')
  return optax.inject_hyperparams(factory)(learning_rate=float(cfg.learning_rate),
                                           **{k: float(v) for k, v in (loss_hparams or {}).items()})


def stage_hparams(method: ml_collections.ConfigDict) -> dict[str, float]:
  """What `make_optimizer(loss_hparams=...)` carries for a method config: every `LOSS_HPARAMS` value, those of
  `ONLY_WHERE_ON` where they are on."""
  return {k: float(method[k]) for k in LOSS_HPARAMS if k not in ONLY_WHERE_ON or float(method[k]) > 0}


def state_hparams(opt_state: Any) -> dict[str, jax.Array]:
  """The loss hyperparameters an optimizer state carries (`make_optimizer(loss_hparams=...)`), or {}."""
  hp = getattr(opt_state, 'hyperparams', None) or {}
  return {k: v for k, v in hp.items() if k in LOSS_HPARAMS}


def sub(tree: Trainables, parts: tuple[str, ...]) -> Trainables:
  return {p: tree[p] for p in parts}


@dataclasses.dataclass(frozen=True)
class NodeProgram:
  """The functions of one node structure (graphdef) under one method config."""
  graphdef: Any
  num_modalities: int
  instr: jax.Array
  instr_mask: jax.Array
  ccl: str                    # 'gram', 'infonce' or 'none'
  tau_ccl: float
  tau_se_ccl: float
  batch_size: int
  optimizer: optax.GradientTransformation
  ccl_anchor: str = 'modality'    # 'text' (answer text embedding) or 'modality' (the node's first)
  # A method's view of the inputs (ml_ecs.algorithms.base.Algorithm): None = as they are.
  input_view: Callable | None = None   # (inputs, mod_mask, modalities) -> (inputs, mod_mask) before fusion
  batch_view: Callable | None = None   # (batch, key, hp) -> batch, on training batches only (hp: `state_hparams`)

  @property
  def has_ccl(self) -> bool:
    """Whether this node has a CCL term: >= 2 views (text anchor + modalities, or >= 2 modalities)."""
    return self.ccl != 'none' and self.num_modalities + (self.ccl_anchor == 'text') >= 2

  def opt(self, spec: StageSpec) -> optax.GradientTransformation:
    return spec.optimizer if spec.optimizer is not None else self.optimizer

  def model(self, tr: Trainables, frozen: nnx.State) -> nnx.Module:
    return params.merge_model(self.graphdef, {**tr, 'frozen': params.compute_frozen(frozen)})

  def instructions(self, b: int) -> tuple[jax.Array, jax.Array]:
    """The instruction tokens and mask repeated for a batch of b samples."""
    return (jnp.broadcast_to(self.instr, (b,) + self.instr.shape),
            jnp.broadcast_to(self.instr_mask, (b,) + self.instr_mask.shape))

  def sample_batch(self, split: SplitArrays, rng: jax.Array) -> SplitArrays:
    """`batch_size` samples drawn uniformly (with replacement) from one node's valid rows."""
    idx = jnp.floor(jax.random.uniform(rng, (self.batch_size,)) * split.count).astype(jnp.int32)
    idx = jnp.minimum(idx, jnp.maximum(split.count - 1, 0))
    take = lambda x: x[idx]
    return SplitArrays(inputs=jax.tree.map(take, split.inputs), mod_mask=take(split.mod_mask),
                       count=split.count, answers=take(split.answers), answer_mask=take(split.answer_mask),
                       labels=take(split.labels), ids=take(split.ids),
                       seq=None if split.seq is None else take(split.seq))

  def encode(self, m, inputs, mod_mask):
    """(projected, z) of a batch, through the method's `input_view` if it has one."""
    if self.input_view is not None:
      inputs, mod_mask = self.input_view(inputs, mod_mask, m.modalities)
    return m.encode(inputs, mod_mask)

  def losses(self, tr: Trainables, frozen: nnx.State, batch: SplitArrays, spec: StageSpec,
             ctx: RoundContext, hp: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """The loss terms of `spec` on one batch; `hp` (`state_hparams`) replaces the program's temperatures."""
    hp = hp or {}
    m = self.model(tr, frozen)
    projected, z = self.encode(m, batch.inputs, batch.mod_mask)
    instr, instr_mask = self.instructions(z.shape[0])
    logits = m(z, instr, instr_mask, batch.answers, batch.answer_mask)
    out = {'lm': lm_loss(logits, batch.answers, batch.answer_mask)}
    if spec.lambda_ccl:
      out['ccl'], out['ccl_anchors'] = self.ccl_term(m, projected, batch, hp.get('tau_ccl'))
    if spec.lambda_se_ccl:
      valid = ctx.target_valid[batch.ids]
      out['se_ccl'] = se_ccl_loss(m.align(z), ctx.targets[batch.ids], batch.ids, batch.ids,
                                  jnp.ones_like(valid), valid, hp.get('tau_se_ccl', self.tau_se_ccl))
    if spec.fedprox_mu:
      sq = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), tr['shared'], ctx.ref_shared)
      out['prox'] = 0.5 * sum(jax.tree.leaves(sq))
    return out

  def ccl_term(self, m, projected: jax.Array, batch: SplitArrays, tau=None) -> tuple[jax.Array, jax.Array]:
    """(CCL of a batch, the rows that anchor a positive pair). Pairs of different rows with the same
    sample id (duplicates of sampling with replacement) or the same sequence id (windows of one
    recording) are excluded from the negatives.

    With the text anchor the views are [answer text, modalities...] for the labelled rows (the text
    is present for them only), and two labelled rows of the same class are no negatives of each other
    (the anchor is a class description); the unlabelled rows, whose class the node does not know,
    join through the modality-to-modality term: CCL over their modality views alone (GRAM anchored on
    the node's first modality). The two terms are averaged weighted by their anchor counts. `tau`: the
    temperature (default the program's `tau_ccl`)."""
    tau = self.tau_ccl if tau is None else tau
    same = batch.ids[:, None] == batch.ids[None, :]
    if batch.seq is not None:
      same = same | (batch.seq[:, None] == batch.seq[None, :])
    if self.ccl_anchor != 'text':
      return (ccl_loss(self.ccl, projected, batch.mod_mask, tau, exclude=same),
              ccl_anchors(self.ccl, batch.mod_mask))
    has_text = batch.answer_mask.sum(-1) > 0
    same = same | (has_text[:, None] & has_text[None, :] & (batch.labels[:, None] == batch.labels[None, :]))
    anchor = m.text_embedding(batch.answers, batch.answer_mask)
    views = jnp.concatenate([anchor[:, None], projected], axis=1)
    mask = jnp.concatenate([has_text[:, None].astype(batch.mod_mask.dtype), batch.mod_mask], axis=1)
    text_loss, n_text = ccl_loss(self.ccl, views, mask, tau, exclude=same), ccl_anchors(self.ccl, mask)
    unlabelled = batch.mod_mask * (~has_text)[:, None].astype(batch.mod_mask.dtype)
    mod_loss = ccl_loss(self.ccl, projected, unlabelled, tau, exclude=same)
    n_mod = ccl_anchors(self.ccl, unlabelled)
    total = n_text + n_mod
    return (n_text * text_loss + n_mod * mod_loss) / jnp.maximum(total, 1.0), total

  def split_lm(self, tr: Trainables, frozen: nnx.State, split: SplitArrays) -> jax.Array:
    """Teacher-forced LM loss over every labelled row of a split (inf if it has none): the
    reliability measure of SE-CCL (ml_ecs.algorithms.ml_ecs.se_ccl)."""
    m = self.model(tr, frozen)
    _, z = self.encode(m, split.inputs, split.mod_mask)
    instr, instr_mask = self.instructions(z.shape[0])
    logits = m(z, instr, instr_mask, split.answers, split.answer_mask)
    loss = lm_loss(logits, split.answers, split.answer_mask)
    return jnp.where(split.answer_mask.sum() > 0, loss, jnp.inf)

  @staticmethod
  def total(terms: dict[str, jax.Array], spec: StageSpec, hp: dict[str, jax.Array] | None = None) -> jax.Array:
    """The weighted sum of the loss terms: the spec's weights, or `hp`'s (`state_hparams`) for a term the
    spec has on."""
    hp = hp or {}
    weight = lambda name: hp[name] if getattr(spec, name) and name in hp else getattr(spec, name)
    weights = {'lm': 1.0, 'ccl': weight('lambda_ccl'), 'se_ccl': weight('lambda_se_ccl'),
               'prox': weight('fedprox_mu'), 'ccl_anchors': 0.0}   # a count (telemetry), not a loss
    return sum(weights[k] * v for k, v in terms.items())

  def init_opt(self, tr: Trainables, spec: StageSpec) -> optax.OptState:
    return self.opt(spec).init(sub(tr, spec.parts))

  def run_stage(self, tr: Trainables, opt_state: optax.OptState, split: SplitArrays, rng: jax.Array,
                ctx: RoundContext, spec: StageSpec) -> tuple[Trainables, optax.OptState, dict]:
    """`spec.steps` optimizer steps; returns (trainables, opt_state, mean loss terms)."""
    frozen = ctx.frozen
    fixed = {p: tr[p] for p in tr if p not in spec.parts}

    def step(carry, key):
      trained, opt_state = carry
      k_batch, k_drop = jax.random.split(key)
      batch = self.sample_batch(split, k_batch)
      hp = state_hparams(opt_state)   # the loss hyperparameters of a run on a run axis, else {}
      if self.batch_view is not None:
        batch = self.batch_view(batch, k_drop, hp)

      def loss_fn(trained):
        terms = self.losses({**trained, **fixed}, frozen, batch, spec, ctx, hp)
        return self.total(terms, spec, hp), terms

      (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
      updates, opt_state = self.opt(spec).update(grads, opt_state, trained)
      return (optax.apply_updates(trained, updates), opt_state), {**terms, 'loss': loss}

    (trained, opt_state), metrics = jax.lax.scan(
        step, (sub(tr, spec.parts), opt_state), jax.random.split(rng, spec.steps))
    return {**tr, **trained}, opt_state, jax.tree.map(jnp.mean, metrics)

  def encode_split(self, tr: Trainables, frozen: nnx.State, split: SplitArrays) -> tuple[jax.Array, jax.Array]:
    """(SE-CCL representations [N, d] (the projection head's output, or z without a head),
    valid [N]) of every row of one node's split."""
    m = self.model(tr, frozen)
    _, z = self.encode(m, split.inputs, split.mod_mask)
    return m.align(z), jnp.arange(z.shape[0]) < split.count

  def generate_split(self, tr: Trainables, frozen: nnx.State, split: SplitArrays, max_len: int) -> jax.Array:
    """Greedy answer tokens [N, max_len] for every row of one node's split."""
    m = self.model(tr, frozen)
    _, z = self.encode(m, split.inputs, split.mod_mask)
    instr, instr_mask = self.instructions(z.shape[0])
    return m.generate(z, instr, instr_mask, max_len)
