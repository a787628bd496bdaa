"""Headroom of a comparison benchmark, checked before its grid runs: does collaboration have anything to give?

Linear probes (softmax regression on simple per-modality features) measure what labels alone are worth on a
partition, without any LM:
  client own     each client's probe trained on its own labelled training windows (its modalities, its masks);
  client pooled  the same client's probe trained on every node's labelled windows seen through its modalities
                 (other clients' labelled training windows and the server's labelled public windows);
  server own     the server's probe on its labelled public training windows (every modality);
  server pooled  the server's probe on its own plus every client's labelled training windows.
Each is scored on the windows the federation's evaluation scores (a client's test split up to
eval.max_test_per_client, the public test split up to eval.max_server_test). pooled - own is the accuracy a
node could gain from the others' labels: the comparison has headroom on a side when it is >= grid.headroom_min
(the probes are also the ceilings results.md prints beside the methods).

A probe is written here in numpy (20 lines) rather than taken from scikit-learn, which is not a dependency:
plain full-batch gradient descent on the softmax cross-entropy with a small L2 penalty, on standardised features.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Callable

import ml_collections
import numpy as np

from ml_ecs.data.cohort_data import labelled_rows
from ml_ecs.data.dataset import MultimodalDataset
from ml_ecs.data.loaders import load_dataset
from ml_ecs.data.partition import partition
from ml_ecs.run import metrics_io
from studies.compare import grid as compare

SIDES = ('client', 'server')


def modality_features(x: np.ndarray) -> np.ndarray:
  """[n, ...] windows of one modality -> [n, F] features: the flattened window, and for a time series
  ([n, T, C]) per-channel spread, peak and mean absolute step."""
  f = [x.reshape(len(x), -1)]
  if x.ndim == 3:
    f += [x.std(1), np.abs(x).max(1), np.abs(np.diff(x, axis=1)).mean(1)]
  return np.concatenate(f, 1).astype(np.float32)


def probe_accuracy(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, num_classes: int,
                   steps: int = 300, lr: float = 0.2, l2: float = 1e-3) -> float:
  """Test accuracy of a softmax-regression probe trained on (xtr, ytr) (features standardised on xtr)."""
  if not len(xtr) or not len(xte):
    return float('nan')
  mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
  xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
  w, b, y1 = np.zeros((xtr.shape[1], num_classes)), np.zeros(num_classes), np.eye(num_classes)[ytr]
  for _ in range(steps):
    z = xtr @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - y1) / len(xtr)
    w -= lr * (xtr.T @ g + l2 * w)
    b -= lr * g.sum(0)
  return float(((xte @ w + b).argmax(1) == yte).mean())


class _Views:
  """Features of every window, seen through a node's modalities with its presence masks (a missing
  modality's block is zero, and a presence column per modality says so)."""

  def __init__(self, ds: MultimodalDataset):
    self.ds = ds
    self.blocks = {m: modality_features(x) for m, x in ds.modalities.items()}

  def view(self, modalities: Sequence[str], idx: np.ndarray, present: np.ndarray) -> np.ndarray:
    """[n, F] features of windows `idx` through `modalities`; present [n, len(modalities)] 0/1."""
    cols = [self.blocks[m][idx] * present[:, j:j + 1] for j, m in enumerate(modalities)]
    return np.concatenate(cols + [present.astype(np.float32)], 1)


def _through(modalities: Sequence[str], own_modalities: Sequence[str], mask: np.ndarray) -> np.ndarray:
  """Presence [n, len(modalities)] of windows whose owner holds `own_modalities` with masks `mask`."""
  cols = [mask[:, list(own_modalities).index(m)] if m in own_modalities else np.zeros(len(mask), np.float32)
          for m in modalities]
  return np.stack(cols, 1).astype(np.float32)


def partition_headroom(ds: MultimodalDataset, cfg: ml_collections.ConfigDict,
                       views: "_Views | None" = None) -> dict[str, Any]:
  """The probes of one run config's partition (see the module docstring): per client own/pooled accuracy,
  their means, the server's own/pooled accuracy, and the gaps pooled - own."""
  views = views or _Views(ds)
  part = partition(ds, cfg.data)
  k = ds.num_classes
  all_mods = tuple(ds.modality_names)
  seed = cfg.data.seed
  # The labelled windows exactly as the federation draws them (ml_ecs.data.cohort_data).
  labelled = []   # (modalities, idx, mask) of every node's labelled training windows
  for c in part.clients:
    keep = labelled_rows(len(c.train_idx), cfg.data.label_fraction, seed, c.client_id) > 0
    labelled.append((c.modalities, c.train_idx[keep], c.train_mask[keep]))
  pub = part.public_train_idx
  keep = labelled_rows(len(pub), cfg.data.server_label_fraction, seed, -2) > 0
  server_mask = ds.presence(all_mods)[pub[keep]].astype(np.float32)
  server_lab = (all_mods, pub[keep], server_mask)

  def train_set(modalities, sources, own: bool):
    """Labelled windows of `sources` through `modalities`: with the owner's presence masks (own=True), or
    as the node itself would see them (every one of its modalities the data holds: others' labels)."""
    xs, ys = [], []
    for mods, idx, mask in sources:
      present = (_through(modalities, mods, mask) if own
                 else ds.presence(tuple(modalities))[idx].astype(np.float32))
      rows = present.sum(1) > 0      # windows with none of the node's modalities carry nothing for it
      xs.append(views.view(modalities, idx[rows], present[rows]))
      ys.append(ds.labels[idx[rows]])
    return np.concatenate(xs), np.concatenate(ys)

  max_test = cfg.eval.max_test_per_client
  clients = {}
  for j, c in enumerate(part.clients):
    test_idx, test_mask = c.test_idx[:max_test], c.test_mask[:max_test]
    xte, yte = views.view(c.modalities, test_idx, test_mask), ds.labels[test_idx]
    own = probe_accuracy(*train_set(c.modalities, [labelled[j]], True), xte, yte, k)
    pooled = probe_accuracy(*train_set(c.modalities, labelled + [server_lab], False), xte, yte, k)
    clients[str(c.client_id)] = {'modalities': list(c.modalities), 'labelled': int(len(labelled[j][1])),
                                 'own': own, 'pooled': pooled}
  test = part.public_test_idx[:cfg.eval.max_server_test]
  xte = views.view(all_mods, test, ds.presence(all_mods)[test].astype(np.float32))
  yte = ds.labels[test]
  server_own = probe_accuracy(*train_set(all_mods, [server_lab], True), xte, yte, k)
  server_pooled = probe_accuracy(*train_set(all_mods, labelled + [server_lab], False), xte, yte, k)
  own = float(np.mean([v['own'] for v in clients.values()]))
  pooled = float(np.mean([v['pooled'] for v in clients.values()]))
  return {'clients': clients, 'client_own': own, 'client_pooled': pooled, 'client_gap': pooled - own,
          'server_labelled': int(keep.sum()), 'server_own': server_own, 'server_pooled': server_pooled,
          'server_gap': server_pooled - server_own}


def check(per_partition: dict[str, dict[str, Any]], minimum: float) -> dict[str, Any]:
  """Mean probes and gaps over partitions, and whether each side's mean gap reaches `minimum`."""
  out: dict[str, Any] = {'partitions': len(per_partition), 'minimum': minimum}
  for side in SIDES:
    for what in ('own', 'pooled', 'gap'):
      out[f'{side}_{what}'] = float(np.mean([p[f'{side}_{what}'] for p in per_partition.values()]))
    out[f'{side}_has_headroom'] = bool(out[f'{side}_gap'] >= minimum)
  return out


def lm_check_config(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The LM check's run (grid.lm_check): a local run of the grid's first setting, partition and training seed,
  with every label."""
  _, rate, clients, p, train_seed = compare.cells(base.grid)[0]
  cfg = compare.cell_config(base, ('local', rate, clients, p, train_seed))
  cfg.data.label_fraction = 1.0
  return cfg


def run_checks(base: ml_collections.ConfigDict, workdir: str, train_fn: Callable,
               log: Callable[[str], None] = print) -> dict[str, Any] | None:
  """The checks before a grid: the probes of every setting's partitions and, with grid.lm_check, one
  full-label local run (does the edge LM write class sentences?). Writes WORKDIR/headroom.json (resumes: a
  finished check is read back) and returns it; None if the LM-check run was interrupted. Raises NoHeadroom
  when a check falls short of grid.headroom_min / grid.lm_check_min (grid.headroom_min <= 0: report only)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'headroom.json')
  out = json.load(open(path)) if os.path.exists(path) else {}
  digest = compare.config_hash(base)
  if out.get('config_hash') != digest:   # another grid config: check again (the LM-check run is kept by its hash)
    out = {'config_hash': digest}
  cells = compare.cells(base.grid)
  first_method, first_train = cells[0][0], cells[0][4]
  minimum = float(base.grid.get('headroom_min', 0.0))
  if 'settings' not in out:
    settings: dict[str, Any] = {}
    for rate, clients in dict.fromkeys((c[1], c[2]) for c in cells):
      per, views = {}, None
      for p in dict.fromkeys(c[3] for c in cells):
        cfg = compare.cell_config(base, (first_method, rate, clients, p, first_train))
        if views is None:   # the data of a setting (a synthetic dataset's size follows the clients)
          views = _Views(load_dataset(cfg.data))
        per[str(p)] = partition_headroom(views.ds, cfg, views)
      key, s = compare.setting_key(rate, clients), check(per, minimum)
      settings[key] = {'partitions': per, 'summary': s}
      log(f"headroom {key}: client probe own {s['client_own']:.3f} pooled "
          f"{s['client_pooled']:.3f}, server own {s['server_own']:.3f} pooled {s['server_pooled']:.3f}")
    out['settings'] = settings
    metrics_io.write_json(path, out)
  if base.grid.get('lm_check', False) and 'lm_check' not in out:
    cfg = lm_check_config(base)
    cdir = os.path.join(workdir, 'headroom', f'lm_check__{compare.config_hash(cfg)}')
    if not os.path.exists(os.path.join(cdir, 'summary.json')):
      log('headroom: the LM check (a local run with every label)')
      if not train_fn(cfg, cdir, os.path.join(workdir, 'cache')):
        return None
    last = metrics_io.read_jsonl(os.path.join(cdir, 'metrics.jsonl'))
    last = [r for r in last if 'client/sentence_mean' in r][-1]
    out['lm_check'] = {'run': os.path.relpath(cdir, workdir), 'round': last['round'],
                       'client_sentence': last['client/sentence_mean'], 'client_accuracy': last['client/accuracy_mean'],
                       'minimum': float(base.grid.get('lm_check_min', 0.0))}
    metrics_io.write_json(path, out)
  short = [f"{k}: {side} probe gap {v['summary'][f'{side}_gap']:+.3f} < grid.headroom_min={minimum}"
           for k, v in out['settings'].items() for side in SIDES
           if minimum > 0 and not v['summary'][f'{side}_has_headroom']]
  lm = out.get('lm_check')
  if lm and lm['client_sentence'] < lm['minimum']:
    short.append(f"LM check: a full-label local client writes a class sentence {lm['client_sentence']:.3f} of the "
                 f"time < grid.lm_check_min={lm['minimum']}")
  if short:
    raise NoHeadroom(f'{path}: the benchmark has no headroom ({"; ".join(short)}); the grid does not start '
                     '(set grid.headroom_min=0 and grid.lm_check=False to run it anyway)')
  return out


class NoHeadroom(ValueError):
  """A benchmark fails its headroom check."""
