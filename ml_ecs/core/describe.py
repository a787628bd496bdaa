"""Descriptions of a federation for its workdir and logs: parameter counts, clients, process holdings,
example answers."""
from __future__ import annotations

from typing import Any

import jax

from ml_ecs.core.evaluate import server_predictions
from ml_ecs.core.setup import Setup
from ml_ecs.core.state import State
from ml_ecs.models import params


def cohort_layout(setup: Setup) -> str:
  """'accel+depth x2 (conv1d/mlp), ...' for logs."""
  parts = []
  for c in setup.cohorts:
    enc = '/'.join(t for _, t in c.data.clients[0].encoder_types)
    parts.append(f"{'+'.join(c.data.modalities)} x{c.num_real} ({enc})")
  return ', '.join(parts)


def host_bytes_per_client(setup: Setup, state: State) -> float:
  """Host bytes one client holds in a host_state federation: its trainables, optimizer state and
  data splits (every stacked leaf's row), averaged over the cohorts' stacked clients."""
  total = rows = 0
  for c, cs in zip(setup.cohorts, state.cohorts):
    splits = [getattr(c.data, s) for s in ('train', 'test', 'public', 'val') if getattr(c.data, s) is not None]
    total += sum(x.nbytes for x in jax.tree.leaves((cs, splits)))
    rows += len(c.client_ids)
  return total / rows


def model_summary(setup: Setup, state: State) -> dict[str, Any]:
  """Parameter counts of one edge model per cohort and of the server model (and with
  train.host_state the host bytes per client, `host_bytes_per_client`)."""
  edge = []
  for c, cs in zip(setup.cohorts, state.cohorts):
    parts = {**params.row_shapes(cs.trainables), 'frozen': setup.edge_frozen}
    edge.append({'modalities': list(c.data.modalities), 'encoders': dict(c.data.clients[0].encoder_types),
                 'clients': c.num_real, 'params': params.count_parts(parts)})
  server = params.count_parts({**state.server.trainables, 'frozen': setup.server_frozen})
  out = {'edge_cohorts': edge, 'server': server, 'total_model_bytes': int(setup.accounting.total_model_bytes),
         'backbones': setup.backbones, 'execution': setup.execution}
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
  beside their references; paraphrase: the answer is, word for word, one of its class's sentences."""
  preds, idx = server_predictions(setup, state)
  out, seen = [], {}
  for pred, i in zip(preds, idx):
    label = int(setup.dataset.labels[i])
    if seen.get(label, 0) < per_class:
      seen[label] = seen.get(label, 0) + 1
      out.append({'class': setup.dataset.class_names[label], 'reference': setup.text.references[i],
                  'generated': pred, 'paraphrase': setup.scorer.is_paraphrase(pred, label)})
  return sorted(out, key=lambda r: r['class'])
