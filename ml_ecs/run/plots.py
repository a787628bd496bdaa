"""Pictures of a run (metrics rows) and of a grid of runs, drawn with matplotlib.

Every `plot_*` function draws into the Axes it is given (a notebook passes its own, inline) or
into a new figure; with `path` it saves a PNG and closes the figure. It returns the figure.
Rows are metrics.jsonl objects: evaluation keys (`client/rougeLsum_mean`, `server/rougeLsum`, ...)
may be on some rows only, training keys (losses, `comm/*`) on others; each series uses the
rows that have it.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

GREY = '#8c8c8c'
LOSS_KEYS = (('client/private_ccl', 'client CCL (private)'), ('client/public_se_ccl', 'client SE-CCL (public)'),
             ('server/ccl', 'server CCL'), ('server/se_ccl', 'server SE-CCL'))
LM_KEYS = (('client/private_lm', 'client LM (private)'), ('client/public_lm', 'client LM (public)'),
           ('server/lm', 'server LM'))


def _plt():
  import matplotlib
  if not _in_notebook():
    matplotlib.use('Agg')  # files only; a notebook keeps its inline backend
  import matplotlib.pyplot as plt
  return plt


def _in_notebook() -> bool:
  try:
    from IPython import get_ipython
    return get_ipython() is not None
  except ImportError:
    return False


def _axes(ax, n: int, size: tuple[float, float] = (5.0, 3.6)):
  """(figure, list of n Axes): the given ones, or a new 1 x n figure."""
  if ax is None:
    fig, axes = _plt().subplots(1, n, figsize=(size[0] * n, size[1]), squeeze=False)
    return fig, list(axes[0])
  axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
  axes = list(np.ravel(axes))
  if len(axes) < n:
    raise ValueError(f'expected {n} Axes, got {len(axes)}')
  return axes[0].figure, axes[:n]


def _finish(fig, path: str | None, tight: bool = True):
  if path is not None:
    save(fig, path, tight=tight)
    _plt().close(fig)
  return fig


def save(fig, path: str, dpi: int = 110, tight: bool = True) -> str:
  """Writes `fig` as a PNG atomically (temp file + rename); returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if tight:
    fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=dpi)
  os.replace(tmp, path)
  return path


def _number(v: Any) -> bool:
  return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))


def series(rows: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(rounds, values) of the rows that hold a finite number under `key`."""
  xs, ys = [], []
  for row in rows:
    if _number(row.get(key)):
      xs.append(int(row['round']))
      ys.append(float(row[key]))
  return xs, ys


def _integer_rounds(ax) -> None:
  from matplotlib.ticker import MaxNLocator
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _line(ax, rows, key: str, label: str, **kw) -> bool:
  xs, ys = series(rows, key)
  if xs:
    ax.plot(xs, ys, marker='o', markersize=3, label=label, **kw)
    _integer_rounds(ax)
  return bool(xs)


def _no_data(ax, what: str) -> None:
  ax.text(0.5, 0.5, f'no {what} yet', ha='center', va='center', transform=ax.transAxes, color=GREY)


def plot_curves(rows: Sequence[Mapping[str, Any]], ax=None, path: str | None = None):
  """Client mean and server ROUGE-LSum (+ multi-reference if logged) and accuracy per round; 2 Axes."""
  fig, (ax_r, ax_a) = _axes(ax, 2)
  drawn = False
  for side, color in (('client', 'C0'), ('server', 'C1')):
    suffix = '_mean' if side == 'client' else ''
    drawn |= _line(ax_r, rows, f'{side}/rougeLsum{suffix}', f'{side} (single ref)', color=color)
    drawn |= _line(ax_r, rows, f'{side}/rougeLsum_multi{suffix}', f'{side} (multi-ref)', color=color, linestyle='--')
  if drawn:
    ax_r.legend(fontsize=8)
  else:
    _no_data(ax_r, 'evaluation')
  ax_r.set(title='ROUGE-LSum', xlabel='round', ylabel='ROUGE-LSum')
  drawn = _line(ax_a, rows, 'client/accuracy_mean', 'client (mean)', color='C0')
  drawn |= _line(ax_a, rows, 'server/accuracy', 'server', color='C1')
  if drawn:
    ax_a.legend(fontsize=8)
  else:
    _no_data(ax_a, 'evaluation')
  ax_a.set(title='accuracy', xlabel='round', ylabel='accuracy')
  return _finish(fig, path)


def last_with(rows: Sequence[Mapping[str, Any]], key: str) -> Mapping[str, Any] | None:
  """The last row that holds `key` (the latest evaluation, for evaluation keys)."""
  for row in reversed(rows):
    if key in row:
      return row
  return None


def modality_set(client: Mapping[str, Any]) -> str:
  return '+'.join(sorted(client.get('modalities', ()))) or 'none'


def plot_clients(rows: Sequence[Mapping[str, Any]], clients: Sequence[Mapping[str, Any]] | None = None,
                 keys: Sequence[str] = ('client/rougeLsum', 'client/accuracy'), ax=None, path: str | None = None):
  """Per-client scores of the latest evaluation as bars, coloured by modality set (clients.json).

  Without `clients` every bar is grey. One Axes per key of `keys` (dicts {client_id: value}).
  """
  fig, axes = _axes(ax, len(keys), size=(5.5, 3.6))
  by_id = {str(c['client_id']): c for c in clients or ()}
  sets = list(dict.fromkeys(modality_set(by_id[k]) for k in sorted(by_id, key=int)))
  colors = {s: f'C{i % 10}' for i, s in enumerate(sets)}
  for ax_k, key in zip(axes, keys):
    row = last_with(rows, key)
    ax_k.set(title=f'{key} (round {row["round"]})' if row else key, xlabel='client', ylabel=key.split('/')[-1])
    if row is None or not row[key]:
      _no_data(ax_k, 'evaluation')
      continue
    ids = sorted(row[key], key=int)
    bar_colors = [colors[modality_set(by_id[i])] if i in by_id else GREY for i in ids]
    ax_k.bar(range(len(ids)), [float(row[key][i]) for i in ids], color=bar_colors)
    ax_k.set_xticks(range(len(ids)), ids, fontsize=8 if len(ids) <= 30 else 5)
  if by_id:
    from matplotlib.patches import Patch
    handles = [Patch(color=colors[s], label=s) for s in sets]
    axes[-1].legend(handles=handles, title='modalities', fontsize=8, title_fontsize=8, loc='best')
  else:
    axes[-1].text(0.99, 0.99, 'modality sets unknown (no clients.json)', ha='right', va='top',
                  transform=axes[-1].transAxes, fontsize=7, color=GREY)
  return _finish(fig, path)


def plot_modality_heatmap(clients: Sequence[Mapping[str, Any]], modalities: Sequence[str] | None = None, ax=None,
                          path: str | None = None):
  """Client x modality presence (clients.json records): which client holds which modality, by cohort."""
  fig, (ax,) = _axes(ax, 1, size=(max(3.0, 0.9 * len(modalities or ()) + 2.0), 0.35 * len(clients) + 1.5))
  mods = list(modalities or dict.fromkeys(m for c in clients for m in c.get('modalities', ())))
  grid = [[1.0 if m in c.get('modalities', ()) else 0.0 for m in mods] for c in clients]
  ax.imshow(grid, cmap='Greens', vmin=0, vmax=1.3, aspect='auto')
  ax.set_xticks(range(len(mods)), mods)
  ax.set_yticks(range(len(clients)), [f"client {c['client_id']} (cohort {c.get('cohort', '?')})" for c in clients],
                fontsize=8)
  ax.set(title='modalities held by each client')
  return _finish(fig, path)


def plot_communication(rows: Sequence[Mapping[str, Any]], ax=None, path: str | None = None):
  """Bytes per round, up and down, stacked: LoRA parameters and fused representations; 2 Axes."""
  fig, axes = _axes(ax, 2)
  for ax_d, direction in zip(axes, ('up', 'down')):
    xs_l, lora = series(rows, f'comm/lora_bytes_{direction}')
    reps_by_round = dict(zip(*series(rows, f'comm/reps_bytes_{direction}')))
    ax_d.set(title=f'bytes {direction} per round', xlabel='round', ylabel='kB')
    if not xs_l:
      _no_data(ax_d, 'communication')
      continue
    lora_kb = np.asarray(lora) / 1e3
    reps_kb = np.asarray([reps_by_round.get(x, 0.0) for x in xs_l]) / 1e3
    ax_d.bar(xs_l, lora_kb, label='LoRA', color='C0')
    ax_d.bar(xs_l, reps_kb, bottom=lora_kb, label='representations', color='C2')
    ax_d.set_ylim(0, 1.3 * max(float((lora_kb + reps_kb).max()), 1e-3))  # room for the legend
    _integer_rounds(ax_d)
    ax_d.legend(fontsize=8, loc='upper right')
  return _finish(fig, path)


def plot_losses(rows: Sequence[Mapping[str, Any]], ax=None, path: str | None = None):
  """CCL and SE-CCL alignment losses (left), LM losses (right), client mean and server, per round."""
  fig, axes = _axes(ax, 2)
  for ax_l, keys, title in ((axes[0], LOSS_KEYS, 'CCL / SE-CCL losses'), (axes[1], LM_KEYS, 'LM losses')):
    drawn = False
    for key, label in keys:
      drawn |= _line(ax_l, rows, key, label, linestyle='-' if key.startswith('client') else '--')
    ax_l.set(title=title, xlabel='round', ylabel='loss')
    if drawn:
      ax_l.legend(fontsize=8)
    else:
      _no_data(ax_l, 'training losses')
  return _finish(fig, path)


def plot_run(rows: Sequence[Mapping[str, Any]], clients: Sequence[Mapping[str, Any]] | None = None,
             path: str | None = None):
  """All four pictures of a run in one 4 x 2 figure (curves, clients, communication, losses)."""
  fig, axes = _plt().subplots(4, 2, figsize=(11, 14))
  plot_curves(rows, ax=axes[0])
  plot_clients(rows, clients, ax=axes[1])
  plot_communication(rows, ax=axes[2])
  plot_losses(rows, ax=axes[3])
  return _finish(fig, path)


# --- grids of runs (method x missing rate x clients x seed) ---

def grid_curves(cells: Sequence[Mapping[str, Any]], key: str = 'client/rougeLsum_mean'
                ) -> dict[tuple[str, float, int], tuple[list[int], list[float]]]:
  """Mean over seeds of `key` per round, per (method, missing rate, clients), over rounds every seed has.

  `cells`: dicts with method, missing_rate, num_clients, seed and rows (a cell's metrics rows).
  """
  grouped: dict[tuple, list[dict[int, float]]] = defaultdict(list)
  for c in cells:
    xs, ys = series(c['rows'], key)
    grouped[(c['method'], float(c['missing_rate']), int(c['num_clients']))].append(dict(zip(xs, ys)))
  out = {}
  for setting, curves in grouped.items():
    common = sorted(set.intersection(*(set(c) for c in curves)))
    if common:
      out[setting] = (common, [float(np.mean([c[x] for c in curves])) for x in common])
  return out


def _methods(items: Iterable[Mapping[str, Any]]) -> list[str]:
  return list(dict.fromkeys(i['method'] for i in items))


def _shared_legend(fig, axes) -> None:
  """One legend for all panels (every method once), right of the figure."""
  labels: dict[str, Any] = {}
  for ax in axes:
    for h, label in zip(*ax.get_legend_handles_labels()):
      labels.setdefault(label, h)
  if labels:
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.legend(list(labels.values()), list(labels), loc='center right', fontsize=8)


def plot_grid_rouge_vs_round(cells: Sequence[Mapping[str, Any]], num_clients: int | None = None,
                             key: str = 'client/rougeLsum_mean', ax=None, path: str | None = None):
  """`key` per round, one line per method (mean over seeds), one panel per missing rate."""
  curves = grid_curves(cells, key)
  if not curves:
    raise ValueError(f'no cell has {key!r} yet')
  clients = num_clients if num_clients is not None else min(s[2] for s in curves)
  rates = sorted({s[1] for s in curves if s[2] == clients})
  fig, axes = _axes(ax, len(rates), size=(4.5, 3.6))
  for ax_r, rate in zip(axes, rates):
    for m in _methods(cells):
      if (m, rate, clients) in curves:
        xs, ys = curves[m, rate, clients]
        ax_r.plot(xs, ys, marker='o', markersize=3, label=m)
    ax_r.set(title=f'missing rate {rate:g}, {clients} clients', xlabel='round', ylabel=key)
  _shared_legend(fig, axes)
  return _finish(fig, path, tight=False)


def plot_grid_rouge_vs_missing_rate(results: Sequence[Mapping[str, Any]], num_clients: int | None = None,
                                    ax=None, path: str | None = None):
  """Final client and server ROUGE-LSum against the missing rate, one line per method (mean over seeds).

  `results`: results.csv rows (method, missing_rate, num_clients, client_rougeLsum, server_rougeLsum).
  """
  if not results:
    raise ValueError('no finished cell in results')
  clients = num_clients if num_clients is not None else min(int(r['num_clients']) for r in results)
  rates = sorted({float(r['missing_rate']) for r in results if int(r['num_clients']) == clients})
  fig, axes = _axes(ax, 2)
  for ax_s, field, side in ((axes[0], 'client_rougeLsum', 'client'), (axes[1], 'server_rougeLsum', 'server')):
    for m in _methods(results):
      ys = []
      for rate in rates:
        vals = [float(r[field]) for r in results if r['method'] == m and float(r['missing_rate']) == rate
                and int(r['num_clients']) == clients]
        ys.append(float(np.mean(vals)) if vals else np.nan)
      ax_s.plot(rates, ys, marker='o', label=m)
    ax_s.set(title=f'{side}, {clients} clients', xlabel='modality missing rate', ylabel='final ROUGE-LSum')
  _shared_legend(fig, axes)
  return _finish(fig, path, tight=False)
