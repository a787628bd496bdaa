"""A durable copy of a comparison's results, beside its scratch workdir (studies/compare/run.py --keep_dir).

The workdir holds what a resume needs inside a run (checkpoints, the compilation cache, program state:
hundreds of MB). The keep directory holds what a *finished* run leaves for the statistics and the reports:
the small files of every run directory that has its summary.json (`RUN_FILES`), and the files the protocol
writes at the workdir's top (`WORKDIR_FILES`). Nothing else travels either way, so a README or notes kept
beside the results in the keep directory are never overwritten. It is small enough to commit
(about 70 KB a run), so a comparison that outlives one machine goes on from it on the next: `restore` copies
into a new workdir what the workdir lacks, and the grid, the tuning and the headroom check skip every run
whose summary.json is there. Work on runs that had not finished is lost, so run long grids in pieces
(--max_minutes) that end between programs.
"""
from __future__ import annotations

import filecmp
import os
import shutil

from ml_ecs.run.metrics_io import temp_name

# The files of a finished run directory that the statistics, the reports and the reproduction check read,
# and what documents the run; not its checkpoints, TensorBoard events or tokenizer (rebuilt from the config).
# summary.json, the mark of a finished run, comes last: a copy cut short never looks finished.
RUN_FILES = ('metrics.jsonl', 'timing.jsonl', 'config.json', 'clients.json', 'model_summary.json', 'program.json',
             'summary.json')
# The files the protocol writes at the top of its workdir (headroom check, tuning, grid, reproduction check).
WORKDIR_FILES = ('headroom.json', 'tuning.csv', 'tuned.json', 'results.csv', 'results.md', 'repro.json',
                 'environment.jsonl', 'rouge_vs_round.png', 'rouge_vs_missing_rate.png')
# Workdir folders that hold run directories (headroom/: the LM check; repro/ and repro_program/: the
# reproduction check's single-run and program reruns).
RUN_FOLDERS = ('headroom', 'tuning', 'cells', 'repro', 'repro_program')


def _copy(src: str, dst: str) -> bool:
  """Copies `src` over `dst` through a temporary file and a rename, unless they are equal; True if copied."""
  if os.path.exists(dst) and filecmp.cmp(src, dst, shallow=False):
    return False
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  tmp = temp_name(dst)
  shutil.copyfile(src, tmp)
  os.replace(tmp, dst)
  return True


def finished_runs(root: str) -> list[str]:
  """Paths, relative to `root`, of the run directories under RUN_FOLDERS that have a summary.json."""
  found = []
  for folder in RUN_FOLDERS:
    for parent, dirs, files in os.walk(os.path.join(root, folder)):
      dirs[:] = sorted(d for d in dirs if d not in ('checkpoints', 'tensorboard'))
      if 'summary.json' in files:
        found.append(os.path.relpath(parent, root))
        dirs[:] = []
  return sorted(found)


def _top_files(root: str) -> list[str]:
  return [f for f in WORKDIR_FILES if os.path.isfile(os.path.join(root, f))]


def save(workdir: str, keep_dir: str) -> int:
  """Copies the workdir's WORKDIR_FILES and every finished run's RUN_FILES into `keep_dir`; returns how many
  files changed there."""
  changed = 0
  for name in _top_files(workdir):
    changed += _copy(os.path.join(workdir, name), os.path.join(keep_dir, name))
  for run in finished_runs(workdir):
    for name in RUN_FILES:
      src = os.path.join(workdir, run, name)
      if os.path.exists(src):
        changed += _copy(src, os.path.join(keep_dir, run, name))
  return changed


def restore(keep_dir: str, workdir: str) -> int:
  """Copies into `workdir` every file of `keep_dir` that the workdir lacks (a workdir's own newer files
  stay); returns how many. A run directory that exists in the workdir unfinished is not touched unless
  the keep directory holds it finished."""
  if not os.path.isdir(keep_dir):
    return 0
  copied = 0
  for name in _top_files(keep_dir):
    dst = os.path.join(workdir, name)
    if not os.path.exists(dst):
      copied += _copy(os.path.join(keep_dir, name), dst)
  for run in finished_runs(keep_dir):
    if os.path.exists(os.path.join(workdir, run, 'summary.json')):
      continue
    for name in RUN_FILES:
      src = os.path.join(keep_dir, run, name)
      if os.path.exists(src):
        copied += _copy(src, os.path.join(workdir, run, name))
  return copied
