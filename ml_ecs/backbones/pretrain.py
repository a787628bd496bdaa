"""Pretraining of the frozen backbones on the task's text corpus.

No pretrained LM can be downloaded here, so each backbone (edge SLM, server LLM)
is first trained as a plain language model on the descriptions that follow the
instruction, after a prefix of random soft-prompt vectors. It then knows the
language of the answers but not which answer a sensor reading calls for; that
mapping is what federated training has to learn through the soft prompt and
LoRA. The result becomes the `Frozen` part of every node with that backbone.
Pretrained weights are cached on disk, keyed by everything they depend on.

`pretrain.corpus` picks the text: 'answers' (the answer paraphrases, as above: the
backbone already knows every answer sentence) or 'generic' (`generic_corpus`: random
word sequences over the words of the answers, built offline from the dataset's own
descriptions, with every sequence that equals an answer sentence dropped). With 'generic'
the backbone knows the vocabulary and token statistics but none of the answer sentences,
so producing an answer has to be learned in federated training.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from ml_ecs.losses.lm import lm_loss
from ml_ecs.models.decoder import DecoderLM
from ml_ecs.models.variables import Frozen
from ml_ecs.data.text import TaskText

CORPORA = ('answers', 'generic')


PROGRESS_CHUNKS = 10   # pretraining runs in this many jitted calls, one progress-bar update each

def generic_corpus(text: TaskText, num: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [n, La], mask [n, La]) of up to `num` random word sequences (2 to 8 words drawn
  uniformly from the answers' vocabulary) that fit the answer length and are not an answer."""
  answers = {' '.join(r.lower().split()) for r in text.references}
  vocab = sorted({w for r in text.references for w in r.lower().split()})
  rng = np.random.default_rng([seed, 7])
  sentences = []
  for _ in range(num):
    words = ' '.join(rng.choice(vocab, size=int(rng.integers(2, 9))))
    if words not in answers:
      sentences.append(words)
  la = text.answers.shape[1]
  ids, mask = text.tokenizer.encode(sentences, 8 * la)
  keep = mask.sum(1) <= la
  if not keep.any():
    raise ValueError('pretrain.corpus=generic: no generic sentence fits text.answer_len')
  return ids[keep, :la], mask[keep, :la]


def pretrain_backbone(backbone_cfg: ml_collections.ConfigDict, prompt_len: int, text: TaskText,
                      cfg: ml_collections.ConfigDict, seed: int, chunk: int | None = None) -> tuple[nnx.State, dict]:
  """Trains a DecoderLM's base weights; returns (Frozen state, {'loss_first', 'loss_final'}).

  `chunk`: steps per jitted call (default: the steps in PROGRESS_CHUNKS calls)."""
  model = DecoderLM(backbone_cfg, text.tokenizer.vocab_size, rngs=nnx.Rngs(seed))
  graphdef, frozen, rest = nnx.split(model, Frozen, ...)
  # Unique (answer, mask) rows; the mask comes from the tokenizer, not from `ids != pad_id`,
  # because a tokenizer may pad with its end-of-text id (HFTokenizer: GPT-2's pad = eos).
  la = text.answers.shape[1]
  tokens, token_mask = ((text.answers, text.answer_mask) if cfg.get('corpus', 'answers') == 'answers'
                        else generic_corpus(text, seed=seed))
  rows = np.unique(np.concatenate([tokens, token_mask.astype(tokens.dtype)], 1), axis=0)
  answers = jnp.asarray(rows[:, :la])
  answer_mask = jnp.asarray(rows[:, la:], jnp.float32)
  instr, instr_mask = jnp.asarray(text.instr), jnp.asarray(text.instr_mask)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)))

  def loss_fn(frozen, key):
    m = nnx.merge(graphdef, frozen, rest)
    k1, k2 = jax.random.split(key)
    idx = jax.random.randint(k1, (cfg.batch_size,), 0, answers.shape[0])
    ans, am = answers[idx], answer_mask[idx]
    b = cfg.batch_size
    prefix = 0.02 * jax.random.normal(k2, (b, prompt_len, backbone_cfg.width))
    x = jnp.concatenate([prefix, m.embed(jnp.broadcast_to(instr, (b, len(instr)))), m.embed(ans[:, :-1])], 1)
    mask = jnp.concatenate([jnp.ones((b, prompt_len)), jnp.broadcast_to(instr_mask, (b, len(instr))), am[:, :-1]], 1)
    logits, _ = m(x, mask)
    return lm_loss(logits[:, -ans.shape[1]:], ans, am)

  @jax.jit
  def train(carry, keys):
    def step(carry, key):
      frozen, opt = carry
      loss, grads = jax.value_and_grad(loss_fn)(frozen, key)
      updates, opt = tx.update(grads, opt, frozen)
      return (optax.apply_updates(frozen, updates), opt), loss
    return jax.lax.scan(step, carry, keys)

  # The steps run in chunks so that a progress bar can follow them (shown on a terminal only);
  # each step computes what one scan over all steps would (bit for bit under XLA's default flags).
  keys = jax.random.split(jax.random.key(seed + 1), cfg.steps)
  size = chunk or -(-cfg.steps // PROGRESS_CHUNKS)
  carry, losses = (frozen, tx.init(frozen)), []
  with tqdm(total=cfg.steps, desc='pretraining backbone', unit='step', disable=None, leave=False) as bar:
    for start in range(0, cfg.steps, size):
      carry, chunk_losses = train(carry, keys[start:start + size])
      losses.append(chunk_losses)
      bar.update(int(chunk_losses.shape[0]))
  frozen, losses = carry[0], jnp.concatenate(losses)
  return frozen, {'loss_first': float(losses[0]), 'loss_final': float(losses[-1])}


def text_digest(text: TaskText) -> str:
  """A digest of everything in `text` that pretraining reads (instruction, answers, masks, references,
  vocabulary size): a backbone cached for other text is never reused."""
  h = hashlib.sha1()
  for a in (text.instr, text.instr_mask, text.answers, text.answer_mask):
    h.update(str((a.dtype, a.shape)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  h.update('\n'.join(text.references).encode())
  h.update(str(text.tokenizer.vocab_size).encode())
  return h.hexdigest()[:16]


def environment_key() -> list:
  """What a pretrained backbone's floats depend on beyond its config: the jax version, the platform and
  the XLA flags (without the forced CPU device count, which pretraining does not use)."""
  flags = sorted(f for f in os.environ.get('XLA_FLAGS', '').split()
                 if not f.startswith('--xla_force_host_platform_device_count'))
  return [jax.__version__, jax.default_backend(), flags]


def _read(path: str) -> dict:
  from flax import serialization
  with open(path, 'rb') as f:
    return serialization.msgpack_restore(f.read())


def _write(path: str, pure: dict) -> None:
  from flax import serialization
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'   # per process: grid cells and runs share the backbone caches
  with open(tmp, 'wb') as f:
    f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, pure)))
  os.replace(tmp, path)


def cached_backbone(name: str, cfg: ml_collections.ConfigDict, text: TaskText, frozen_template: nnx.State,
                    cache_dir: str | None, tokenizer_id: str = '',
                    shared_cache: str | None = None) -> tuple[nnx.State, dict | None]:
  """The pretrained frozen backbone of model `name` ('edge_model' or 'server_model') of config `cfg`.

  Read from the run's own cache_dir/backbones/ when present (a resume uses the backbone the run was
  trained with, on any machine); else from shared_cache/backbones/ (kept across runs, e.g. the main job's
  user cache folder; keyed also by `environment_key`, so it holds what this process would compute)
  and copied into the run's cache; else pretrained and written to both (atomically).
  `tokenizer_id` names a tokenizer other than the run's own BPE (the Hugging Face checkpoint
  whose tokenizer the text uses); it is part of the cache key.
  Returns (frozen state in the structure of `frozen_template`, pretraining info or None if cached).
  """
  mcfg = cfg[name]
  # hf is '' here (our own); frozen_dtype is how the result is held afterwards, not what is pretrained.
  backbone = {k: v for k, v in mcfg.backbone.to_dict().items() if k not in ('hf', 'frozen_dtype')}
  key = [backbone, mcfg.prompt_len, cfg.text.to_dict(), cfg.pretrain.to_dict(),
         cfg.seed, cfg.data.name, cfg.data.path, name] + ([tokenizer_id] if tokenizer_id else [])
  key = json.dumps(key, sort_keys=True, default=str)
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  path = os.path.join(cache_dir, 'backbones', f'{name}-{digest}.msgpack') if cache_dir else None
  shared = None
  if shared_cache:
    shared_key = json.dumps([key, text_digest(text), environment_key()], sort_keys=True, default=str)
    shared = os.path.join(shared_cache, 'backbones', f'{name}-{hashlib.sha1(shared_key.encode()).hexdigest()[:16]}.msgpack')
  info = None
  if path and os.path.exists(path):
    pure = _read(path)
  elif shared and os.path.exists(shared):
    pure = _read(shared)
    if path:
      _write(path, pure)
  else:
    backbone_state, info = pretrain_backbone(mcfg.backbone, mcfg.prompt_len, text, cfg.pretrain,
                                             cfg.seed + (0 if name == 'edge_model' else 1))
    pure = {'backbone': nnx.to_pure_dict(backbone_state)}
    for target in (path, shared):
      if target:
        _write(target, pure)
  expected = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(frozen_template))
  got = jax.tree.map(lambda x: tuple(np.shape(x)), pure)
  if got != expected:
    raise ValueError(f'backbone weights for {name} ({path or "pretrained"}) do not match {name}.backbone; '
                     'delete the cached file to retrain')
  nnx.replace_by_pure_dict(frozen_template, jax.device_put(pure))   # one transfer, no per-leaf program
  return frozen_template, info
