"""Evaluation of a federation: every (or a sampled set of) client's generations on its test split and the
server's on the public test split, scored with ROUGE and accuracy (`ml_ecs.core.scoring`)."""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ml_ecs.algorithms.ml_ecs import amt
from ml_ecs.core import distributed, faults
from ml_ecs.core.client_store import bucket, gather_clients, pad_positions
from ml_ecs.core.cohort_map import CLIENT_AXIS, client_devices
from ml_ecs.core.scoring import SCORE_NAMES
from ml_ecs.core.setup import Setup
from ml_ecs.core.state import State
from ml_ecs.data.partition import ClientSpec
from ml_ecs.models.multimodal import model_options


# one compiled call per evaluation, not an eagerly dispatched op per leaf
_global_view = jax.jit(amt.global_view, static_argnums=2)


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
  size = bucket(_eval_shares(setup)[k], client_devices(setup.mesh))
  pos = np.arange(c.num_real) if pos is None else pos
  return [(pad_positions(pos[i:i + size], size), pos[i:i + size]) for i in range(0, len(pos), size)]


class Generated(NamedTuple):
  """Answer tokens decoded beforehand (e.g. for many runs in one call, ml_ecs.core.runs), per cohort
  [clients, rows >= the split's, answer_len]: the clients' own models, the global view (None without
  communication), and the server's [rows, answer_len]."""
  clients: Sequence[np.ndarray]
  global_view: Sequence[np.ndarray] | None
  server: np.ndarray


def _client_generations(setup: Setup, trainables: Sequence[dict], split: str = 'test',
                        positions: Sequence[np.ndarray | None] | None = None, view: Callable | None = None,
                        tokens: Sequence[np.ndarray] | None = None
                        ) -> Iterator[tuple[ClientSpec, list[str] | None, np.ndarray, np.ndarray]]:
  """Per real client (of `positions[k]` in cohort k, all when None): (spec, generated answers on its
  `split` or None when its weights are not finite, their dataset indices, their labels). Clients are
  decoded in padded blocks (`eval_blocks`, one batched generate call each); `view` maps the (gathered)
  stacked trainables before decoding. `tokens`: per cohort, every client's answers decoded beforehand
  (all positions, device-resident cohorts)."""
  positions = positions or [None] * len(setup.cohorts)
  sharding = NamedSharding(setup.mesh, P(CLIENT_AXIS))
  for k, (c, tr_all, pos) in enumerate(zip(setup.cohorts, trainables, positions)):
    data_all, index_lists = c.data.eval_split(split)
    for block, real in eval_blocks(setup, k, pos):
      tr, data = (tr_all, data_all) if block is None else gather_clients((tr_all, data_all), block, sharding)
      tr = jax.device_put(view(tr), sharding) if view is not None else tr   # one sharding: one compilation
      if tokens is not None and block is None:
        counts, labels, finite = distributed.to_host((data.count, data.labels, faults.clients_finite(tr)))
        toks = tokens[k]
      else:
        toks, counts, labels, finite = distributed.to_host(   # every process scores every client
            (c.generate_fn(tr, data, setup.edge_frozen), data.count, data.labels, faults.clients_finite(tr)))
      for j, p in enumerate(real):
        n = counts[j]
        preds = setup.text.tokenizer.decode(toks[j, :n]) if finite[j] else None
        yield c.data.clients[p], preds, index_lists[p][:n], labels[j, :n]


def _score_clients(setup: Setup, trainables: Sequence[dict], split: str = 'test',
                   positions: Sequence[np.ndarray | None] | None = None, view: Callable | None = None,
                   tokens: Sequence[np.ndarray] | None = None) -> tuple[dict[str, dict[str, float]], list[int]]:
  """Scores of every (or the `positions`) real client's generations on its `split` ('test' or 'val'),
  given each cohort's trainables, and the ids of the clients left out because their weights are not
  finite (left out of every client mean, ml_ecs.core.faults)."""
  per_client: dict[str, dict[str, float]] = {}
  diverged: list[int] = []
  for spec, preds, idx, labels in _client_generations(setup, trainables, split, positions, view, tokens):
    if preds is None:
      diverged.append(int(spec.client_id))
    else:
      per_client[str(spec.client_id)] = setup.scorer.score(preds, [setup.text.references[i] for i in idx],
                                                           labels.tolist())
  return per_client, diverged


def client_answers(setup: Setup, state: State, split: str = 'test') -> list[dict[str, Any]]:
  """Every client's generated answer for each of its `split` windows: client_id, class, reference,
  generated, paraphrase (the answer is, word for word, one of its class's sentences)."""
  names = setup.dataset.class_names
  out = []
  for spec, preds, idx, labels in _client_generations(setup, [cs.trainables for cs in state.cohorts], split):
    for pred, i, y in zip(preds or [], idx, labels):
      out.append({'client_id': int(spec.client_id), 'class': names[int(y)], 'reference': setup.text.references[i],
                  'generated': pred, 'paraphrase': setup.scorer.is_paraphrase(pred, int(y))})
  return out


def server_split(setup: Setup, split: str = 'test'):
  """(the server's public test or validation split, its dataset indices)."""
  return ((setup.public_val, setup.partition.public_val_idx) if split == 'val'
          else (setup.public_test, setup.partition.public_test_idx))


def server_predictions(setup: Setup, state: State, split: str = 'test', tokens: np.ndarray | None = None
                       ) -> tuple[list[str], np.ndarray]:
  """The server's generated answers on its public test (or validation) split (decoded now, or `tokens`
  decoded beforehand), and their dataset indices."""
  server_split_, server_idx = server_split(setup, split)
  toks = tokens if tokens is not None else distributed.to_host(
      setup.server_generate_fn(state.server.trainables, setup.server_frozen, server_split_))
  n = int(server_split_.count)
  return setup.text.tokenizer.decode(toks[:n]), server_idx[:n]


def evaluate(setup: Setup, state: State, split: str = 'test', full: bool = False,
             generated: Generated | None = None) -> dict[str, Any]:
  """ROUGE and accuracy of every client on its test split and of the server on the public test split
  (split='val': the validation splits cut for tuning; never the test data).

  client/*: the personalised models (what each client trains and uses); with communication
  also client/global_*: the global model, the aggregated shared LoRA in each client's model
  with the private LoRA off (`amt.global_view`). *_multi: multi-reference ROUGE-LSum.
  With eval.clients_per_eval the client scores cover a sample drawn per round (`full`: every
  client), and client/evaluated says how many clients they cover. `generated`: the answers decoded
  beforehand (every client; ml_ecs.core.runs decodes many runs' in one call), scored here.
  """
  t0 = time.perf_counter()
  text, scorer = setup.text, setup.scorer
  positions = eval_positions(setup, int(state.round), full)
  if generated is not None and any(p is not None for p in positions):
    raise ValueError('answers decoded beforehand cover every client: not with eval.clients_per_eval sampling')
  per_client, diverged = _score_clients(setup, [cs.trainables for cs in state.cohorts], split, positions,
                                        tokens=generated.clients if generated is not None else None)
  gates = model_options(setup.cfg)['gates']
  per_global = _score_clients(setup, [cs.trainables for cs in state.cohorts], split, positions,
                              lambda tr: _global_view(tr, state.global_shared, gates),
                              tokens=generated.global_view if generated is not None else None)[0] \
      if setup.communicate else {}
  server_preds, idx = server_predictions(setup, state, split, generated.server if generated is not None else None)
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


FLOOR_ANSWERS = ('the', 'majority')   # the constant answers of `floors`
FLOOR_SCORES = ('rougeLsum', 'rougeLsum_multi', 'accuracy')


def floors(setup: Setup) -> dict[str, float]:
  """Trivial answers scored exactly as `evaluate` scores the models, on the same test windows: each
  client (and the server) always answering 'the', or always answering the first paraphrase of the
  majority class of its own training windows. A method is only learning once it is above both.
  Keys: floor/{client,server}/{the,majority}_{rougeLsum,rougeLsum_multi,accuracy} (client: mean over
  clients)."""
  scorer, refs, labels = setup.scorer, setup.text.references, setup.dataset.labels
  names = setup.dataset.class_names

  def constant(train_idx, test_idx) -> dict[str, dict[str, float]]:
    majority = scorer.descriptions[int(np.bincount(labels[train_idx], minlength=len(names)).argmax())][0]
    y = labels[test_idx].tolist()
    return {a: scorer.score([ans] * len(y), [refs[i] for i in test_idx], y)
            for a, ans in zip(FLOOR_ANSWERS, ('the', majority))}

  max_test = setup.cfg.eval.max_test_per_client
  per_client = [constant(spec.train_idx, spec.test_idx[:max_test])
                for c in setup.cohorts for spec in c.data.clients[:c.num_real]]
  part = setup.partition
  server = constant(part.public_train_idx, part.public_test_idx[:int(setup.public_test.count)])
  out = {}
  for a in FLOOR_ANSWERS:
    for t in FLOOR_SCORES:
      out[f'floor/client/{a}_{t}'] = float(np.mean([s[a][t] for s in per_client]))
      out[f'floor/server/{a}_{t}'] = server[a][t]
  return out
