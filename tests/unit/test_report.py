"""Plots and the report command on small synthetic workdirs (no training; the real tiny run is in
tests/integration/test_report.py)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.colors import to_hex

from ml_ecs.run import plots
from ml_ecs.run.report import NotAWorkdirError, load_grid, report
from tests.paths import ROOT

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
CLIENTS = [{'client_id': 0, 'modalities': ['accel', 'depth'], 'encoders': {'accel': 'conv1d', 'depth': 'mlp'},
            'cohort': 0, 'num_train': 10},
           {'client_id': 1, 'modalities': ['image'], 'encoders': {'image': 'mlp'}, 'cohort': 1, 'num_train': 8},
           {'client_id': 2, 'modalities': ['depth', 'accel'], 'encoders': {'accel': 'conv1d', 'depth': 'mlp'},
            'cohort': 0, 'num_train': 12}]


def run_rows(rounds: int = 4, eval_every: int = 2, multi: bool = False, seed: int = 0) -> list[dict]:
  """Round 0 evaluation only; then a training row every round with evaluation every `eval_every`."""
  rng = np.random.default_rng(seed)
  rows = []
  for r in range(rounds + 1):
    row: dict = {'round': r}
    if r > 0:
      row.update({'client/private_lm': 3.0 - 0.1 * r, 'client/public_lm': 3.1 - 0.1 * r, 'server/lm': 2.5 - 0.1 * r,
                  'client/private_ccl': 1.5, 'client/public_se_ccl': 2.0 - 0.2 * r, 'server/ccl': 2.1,
                  'server/se_ccl': 1.6 - 0.3 * r, 'comm/lora_bytes_up': 1000 * r, 'comm/reps_bytes_up': 300,
                  'comm/lora_bytes_down': 1000, 'comm/reps_bytes_down': 300, 'comm/bytes_up': 1000 * r + 300,
                  'time/round_s': 0.1})
    if r == 0 or r % eval_every == 0 or r == rounds:
      per = {str(c): float(rng.uniform(0.2, 0.6)) for c in range(3)}
      row.update({'client/rougeLsum': per, 'client/rougeLsum_mean': float(np.mean(list(per.values()))),
                  'client/accuracy': {str(c): 0.5 for c in range(3)}, 'client/accuracy_mean': 0.5,
                  'server/rougeLsum': 0.3 + 0.02 * r, 'server/accuracy': 0.6, 'samples/server_prediction': 'x'})
      if multi:
        row['client/rougeLsum_multi_mean'] = row['client/rougeLsum_mean'] + 0.1
        row['server/rougeLsum_multi'] = row['server/rougeLsum'] + 0.1
    rows.append(row)
  return rows


def write_run(workdir, rows, clients=None, cfg=None) -> str:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  if clients is not None:
    with open(os.path.join(workdir, 'clients.json'), 'w') as f:
      json.dump(clients, f)
  if cfg is not None:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(cfg, f)
  return str(workdir)


def assert_png(path: str, min_bytes: int = 5000) -> None:
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:8] == PNG_MAGIC, path
  assert len(data) > min_bytes, (path, len(data))
  import matplotlib.image as mpimg
  img = mpimg.imread(path)
  assert img.shape[0] > 200 and img.shape[1] > 400
  assert img[..., :3].std() > 0.05  # not a blank canvas


def test_curves_follow_the_rows_and_skip_rows_without_evaluation():
  rows = run_rows(rounds=5, eval_every=2, multi=True)
  fig = plots.plot_curves(rows)
  ax_r, ax_a = fig.axes[:2]
  lines = {l.get_label(): l for l in ax_r.get_lines()}
  assert set(lines) == {'client (single ref)', 'server (single ref)', 'client (multi-ref)', 'server (multi-ref)'}
  assert list(lines['client (single ref)'].get_xdata()) == [0, 2, 4, 5]
  assert list(lines['server (single ref)'].get_ydata()) == pytest.approx([0.3, 0.34, 0.38, 0.4])
  assert list(lines['server (multi-ref)'].get_ydata()) == pytest.approx([0.4, 0.44, 0.48, 0.5])
  assert {l.get_label() for l in ax_a.get_lines()} == {'client (mean)', 'server'}
  # Without the multi-reference keys, no multi-reference lines.
  fig = plots.plot_curves(run_rows())
  assert {l.get_label() for l in fig.axes[0].get_lines()} == {'client (single ref)', 'server (single ref)'}


def test_client_bars_coloured_by_modality_set_and_grey_without_clients():
  rows = run_rows()
  fig = plots.plot_clients(rows, CLIENTS)
  ax = fig.axes[0]
  bars = ax.patches
  assert [b.get_height() for b in bars] == pytest.approx([rows[-1]['client/rougeLsum'][str(i)] for i in range(3)])
  colors = [to_hex(b.get_facecolor()) for b in bars]
  assert colors[0] == colors[2] != colors[1]  # clients 0 and 2 share {accel, depth}
  assert GREY_HEX not in colors
  legend = fig.axes[-1].get_legend()
  assert sorted(t.get_text() for t in legend.get_texts()) == ['accel+depth', 'image']
  fig = plots.plot_clients(rows, None)
  assert {to_hex(b.get_facecolor()) for b in fig.axes[0].patches} == {GREY_HEX}
  assert fig.axes[-1].get_legend() is None


GREY_HEX = to_hex(plots.GREY)


def test_communication_is_stacked_lora_and_representations():
  fig = plots.plot_communication(run_rows(rounds=3))
  bars = fig.axes[0].patches  # up: 3 LoRA bars then 3 representation bars on top of them
  assert len(bars) == 6
  assert [b.get_height() for b in bars[:3]] == pytest.approx([1.0, 2.0, 3.0])  # kB
  assert [b.get_height() for b in bars[3:]] == pytest.approx([0.3] * 3)
  assert [b.get_y() for b in bars[3:]] == pytest.approx([1.0, 2.0, 3.0])


def test_losses_panels():
  fig = plots.plot_losses(run_rows(rounds=3))
  assert {l.get_label() for l in fig.axes[0].get_lines()} == {label for _, label in plots.LOSS_KEYS}
  assert {l.get_label() for l in fig.axes[1].get_lines()} == {label for _, label in plots.LM_KEYS}
  align = next(l for l in fig.axes[0].get_lines() if l.get_label() == 'server SE-CCL')
  assert list(align.get_xdata()) == [1, 2, 3]
  assert list(align.get_ydata()) == pytest.approx([1.3, 1.0, 0.7])


def test_plot_into_given_axes():
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2)
  assert plots.plot_losses(run_rows(), ax=axes) is fig
  with pytest.raises(ValueError, match='expected 2 Axes'):
    plots.plot_curves(run_rows(), ax=axes[0])
  plt.close(fig)


def test_run_report_writes_pngs(tmp_path):
  workdir = write_run(tmp_path / 'run', run_rows(), CLIENTS)
  paths = report(workdir)
  assert [os.path.basename(p) for p in paths] == ['curves.png', 'clients.png', 'communication.png', 'losses.png']
  for p in paths:
    assert os.path.dirname(p) == os.path.join(workdir, 'report')
    assert_png(p)


def test_report_on_a_running_workdir(tmp_path):
  """Only round 0 written (no training rows yet) and a torn last line: still draws every picture."""
  workdir = write_run(tmp_path / 'run', run_rows(rounds=0))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"round": 1, "client/priv')
  for p in report(workdir):
    assert_png(p, min_bytes=3000)


def test_report_error_names_the_directory(tmp_path):
  empty = tmp_path / 'nothing_here'
  empty.mkdir()
  with pytest.raises(NotAWorkdirError, match='nothing_here.*metrics.jsonl.*results.csv'):
    report(str(empty))
  with pytest.raises(NotAWorkdirError, match='no such directory'):
    report(str(tmp_path / 'missing'))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'report.py'), f'--workdir={empty}'],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert str(empty) in proc.stderr and 'metrics.jsonl' in proc.stderr


def write_grid(workdir, methods=('fedavg', 'ml_ecs'), rates=(0.3, 0.7), seeds=(0, 1), finished=True) -> str:
  results = []
  for m in methods:
    for rate in rates:
      for s in seeds:
        rows = run_rows(rounds=4, seed=s)
        cfg = {'method': {'name': m}, 'data': {'modality_missing_rate': rate, 'num_clients': 3}, 'seed': s}
        write_run(os.path.join(workdir, 'cells', f'cell_{m}_{rate}_{s}'), rows, cfg=cfg)
        results.append({'method': m, 'missing_rate': rate, 'num_clients': 3, 'seed': s,
                        'client_rougeLsum': rows[-1]['client/rougeLsum_mean'],
                        'server_rougeLsum': rows[-1]['server/rougeLsum']})
  if finished:
    with open(os.path.join(workdir, 'results.csv'), 'w', newline='') as f:
      w = csv.DictWriter(f, fieldnames=list(results[0]))
      w.writeheader()
      w.writerows(results)
  return str(workdir)


def test_grid_curves_mean_over_seeds_on_common_rounds():
  cells = [{'method': 'a', 'missing_rate': 0.3, 'num_clients': 3, 'seed': 0,
            'rows': [{'round': 0, 'k': 1.0}, {'round': 1}, {'round': 2, 'k': 3.0}]},
           {'method': 'a', 'missing_rate': 0.3, 'num_clients': 3, 'seed': 1,
            'rows': [{'round': 0, 'k': 2.0}]}]  # a cell still running
  assert plots.grid_curves(cells, 'k') == {('a', 0.3, 3): ([0], [1.5])}


def test_grid_report(tmp_path):
  workdir = write_grid(tmp_path / 'grid')
  results, cells = load_grid(workdir)
  assert len(results) == 8 and len(cells) == 8
  assert {(c['method'], c['missing_rate'], c['seed']) for c in cells} == {
      (m, r, s) for m in ('fedavg', 'ml_ecs') for r in (0.3, 0.7) for s in (0, 1)}
  fig = plots.plot_grid_rouge_vs_missing_rate(results)
  line = next(l for l in fig.axes[1].get_lines() if l.get_label() == 'ml_ecs')
  assert list(line.get_xdata()) == [0.3, 0.7] and list(line.get_ydata()) == pytest.approx([0.38, 0.38])
  paths = report(workdir)
  assert [os.path.basename(p) for p in paths] == ['rouge_vs_round.png', 'rouge_vs_missing_rate.png']
  for p in paths:
    assert_png(p)


def test_grid_report_before_any_cell_finished(tmp_path):
  workdir = write_grid(tmp_path / 'grid', finished=False)
  paths = report(workdir)
  assert [os.path.basename(p) for p in paths] == ['rouge_vs_round.png']
  assert_png(paths[0])


def test_environment_records_the_commit_of_the_code_loaded_not_a_later_head(monkeypatch):
  from ml_ecs.run import environment
  monkeypatch.setattr(environment, '_git_commit', lambda: 'a-later-head')   # the repository moved on
  assert environment.environment()['git_commit'] == environment.LOADED_COMMIT != 'a-later-head'
