"""Many federations as one program (ml_ecs.core.runs, ml_ecs.run.runs_trainer): R = 3 runs with different
training seeds, partition seeds, learning rates, ML-ECS loss weights and temperatures and MMA weightings give the
metrics of 3 separate runs, write the same run directories, and resume exactly from the program's checkpoint;
so do 2 runs of the multimodal baseline with different modality dropout rates."""
import json
import os
import shutil

import pytest

from ml_ecs.core import runs as runs_lib
from ml_ecs.run import metrics_io, trainer
from ml_ecs.run.runs_trainer import train_runs

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('runs')]
# Run 0 is configs/tiny.py itself: its separate run reuses the programs the suite's other tiny runs compile
# (tests/paths.py's shared compilation cache); runs 1 and 2 differ from it in every RUN_FIELD.
RUNS = [(0, 0, 3e-3), (1, 3, 1e-3), (2, 5, 2e-3)]   # (seed, data.seed, train.learning_rate)
# (method.lambda_ccl, tau_ccl, lambda_se_ccl, tau_se_ccl) of each run
LOSS = [(0.1, 0.2, 0.5, 0.2), (0.5, 0.1, 0.3, 0.6), (1.0, 0.3, 0.1, 0.4)]
# method.mma_backbone of each run: the tiny partitions' clients differ in samples and in modality counts, so each
# weighting weighs them otherwise
MMA = ['samples', 'modality', 'modality_samples']


def _configs(tiny_config, method='ml_ecs'):
  from ml_ecs.algorithms.registry import apply_strategy
  out = []
  for (seed, data_seed, lr), (l_ccl, t_ccl, l_se, t_se), mma in zip(RUNS, LOSS, MMA):
    c = apply_strategy(tiny_config, method)
    c.seed, c.data.seed, c.train.learning_rate = seed, data_seed, lr
    if method == 'ml_ecs':
      c.method.lambda_ccl, c.method.tau_ccl, c.method.lambda_se_ccl, c.method.tau_se_ccl = l_ccl, t_ccl, l_se, t_se
      c.method.mma_backbone = mma
    c.train.checkpoint_every = 1
    out.append(c)
  return out


def test_the_first_run_is_the_tiny_config(tiny_config):
  """What lets run 0 share the suite's compiled tiny programs (checkpoint_every is host-side only)."""
  from ml_ecs.config.identity import config_differences
  assert config_differences(tiny_config.to_dict(), _configs(tiny_config)[0].to_dict()) == ['train.checkpoint_every']


def _rows(workdir):
  return metrics_io.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


def _assert_same_rows(a, b, where):
  assert len(a) == len(b), where
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys(), where
    for k, v in ra.items():
      if isinstance(v, float):
        assert rb[k] == pytest.approx(v, rel=1e-4, abs=1e-5), f'{where} round {ra["round"]}: {k}'
      else:
        assert rb[k] == v, f'{where} round {ra["round"]}: {k}'


@pytest.fixture(scope='module')
def separate_and_program(tmp_path_factory, tiny_config, dataset):
  base = tmp_path_factory.mktemp('runs')
  cache = str(base / 'cache')
  cfgs = _configs(tiny_config)
  separate = [str(base / f'separate_{r}') for r in range(len(cfgs))]
  for cfg, w in zip(cfgs, separate):
    assert trainer.train(cfg, w, progress=False, cache_dir=cache, dataset=dataset, log=lambda s: None).status == 'complete'
  program = [str(base / f'program_{r}') for r in range(len(cfgs))]
  results = train_runs(cfgs, program, str(base / 'program'), cache_dir=cache, dataset=dataset, log=lambda s: None)
  assert [r.status for r in results] == ['complete'] * len(cfgs)
  return cfgs, separate, program, str(base / 'program'), cache, dataset


def test_program_equals_separate_runs(separate_and_program):
  cfgs, separate, program, *_ = separate_and_program
  for r, (a, b) in enumerate(zip(separate, program)):
    _assert_same_rows(_rows(a), _rows(b), f'run {r}')
    for name in ('summary.json', 'config.json', 'clients.json'):
      with open(os.path.join(a, name)) as fa, open(os.path.join(b, name)) as fb:
        ja, jb = json.load(fa), json.load(fb)
      if name == 'summary.json':   # the same fields; their values are the rows' (compared above)
        assert ja.keys() == jb.keys(), name
      else:
        assert ja == jb, name
    assert len(metrics_io.read_jsonl(os.path.join(b, 'timing.jsonl'))) == cfgs[0].train.rounds + 1
    with open(os.path.join(b, 'program.json')) as f:   # what reproducing the run reruns
      assert json.load(f) == {'runs': len(cfgs), 'position': r, 'members': [os.path.basename(w) for w in program],
                              'mesh': {'clients': 1}, 'run_batch': runs_lib.run_batch(len(cfgs), 1) or len(cfgs)}
  # the runs really differ (seeds and rates reach them): their LM losses are not the same
  losses = {_rows(w)[-1]['client/private_lm'] for w in program}
  assert len(losses) == len(program)


def test_program_resumes_exactly(separate_and_program):
  """Resumed with every run computed at once (vmapped: an accelerator's default), the program that ran one run
  at a time on this CPU gives the same metrics: the two ways compute the same."""
  cfgs, _, program, program_dir, cache, dataset = separate_and_program
  assert runs_lib.run_batch(len(cfgs), 1) == 1   # the program above ran one run at a time
  before = [_rows(w) for w in program]
  last = cfgs[0].train.rounds
  shutil.rmtree(os.path.join(program_dir, 'checkpoints', str(last)))   # as if killed before the last checkpoint
  for w in program:
    os.remove(os.path.join(w, 'summary.json'))
    metrics_io.write_jsonl(os.path.join(w, 'metrics.jsonl'), _rows(w)[:last])
  lines = []
  results = train_runs(cfgs, program, program_dir, cache_dir=cache, dataset=dataset, log=lines.append,
                       run_batch_size=len(cfgs))
  assert [r.status for r in results] == ['complete'] * len(cfgs)
  assert results[0].resumed_from == last - 1, lines
  assert any('all runs at once' in line for line in lines), lines
  for r, w in enumerate(program):
    _assert_same_rows(before[r], _rows(w), f'resumed run {r}')


def test_a_finished_run_is_refused(separate_and_program):
  cfgs, separate, _, program_dir, cache, dataset = separate_and_program
  with pytest.raises(trainer.WorkdirConflict, match='finished run'):
    train_runs(cfgs, separate, program_dir + '_other', cache_dir=cache, dataset=dataset, log=lambda s: None)


def test_runs_of_other_structure_are_refused(tiny_config):
  cfgs = _configs(tiny_config)
  cfgs[1].train.batch_size = 4
  with pytest.raises(ValueError, match=r"run 1 differs from run 0 in \['train.batch_size'\]"):
    runs_lib.check_configs(cfgs)


def test_dropout_rates_on_the_run_axis_equal_separate_runs(tmp_path, tiny_config, dataset):
  """The multimodal baseline's modality dropout is state on the run axis: 2 runs with rates 0.2 and 0.6 as one
  program give the metrics of the 2 runs alone (a program that used run 0's rate for both would not)."""
  cfgs = _configs(tiny_config, 'mmfl')[:2]
  for c, rate in zip(cfgs, (0.2, 0.6)):
    c.method.modality_dropout = rate
    c.train.rounds, c.train.checkpoint_every = 2, 0
  cache = str(tmp_path / 'cache')
  quiet = lambda s: None
  separate = [str(tmp_path / f'separate_{r}') for r in range(2)]
  program = [str(tmp_path / f'program_{r}') for r in range(2)]
  for cfg, w in zip(cfgs, separate):
    assert trainer.train(cfg, w, progress=False, cache_dir=cache, dataset=dataset, log=quiet).status == 'complete'
  results = train_runs(cfgs, program, str(tmp_path / 'program'), cache_dir=cache, dataset=dataset, log=quiet)
  assert [r.status for r in results] == ['complete'] * 2
  for r, (a, b) in enumerate(zip(separate, program)):
    _assert_same_rows(_rows(a), _rows(b), f'run {r}')
