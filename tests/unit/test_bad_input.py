"""Bad input is refused with one clear line naming the field or file, before any result file changes.

Most cases call validate() / the data checks / the loaders in-process; a handful spawn the three
launchers (absl flag parsing) and fail before any JAX work. Each asserts the failure, that the
message names the field or file (and value), and that an existing result file is untouched.
"""
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from studies.compare import grid as compare
from ml_ecs.run import trainer
from ml_ecs.run.checkpoint import Checkpointer
from ml_ecs.config.validation import ConfigError, DataError, check_devices, check_partition, validate
from tests.paths import ROOT

SENTINEL = 'row from an earlier run\n'


def _tiny():
  from configs import tiny
  return tiny.get_config()


def _set(cfg, field, value):
  node = cfg
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value
  return cfg


@pytest.fixture
def results(tmp_path):
  """A workdir holding an earlier run's result file; yields a check that it is unchanged."""
  path = tmp_path / 'metrics.jsonl'
  path.write_text(SENTINEL)
  yield tmp_path
  assert path.read_text() == SENTINEL
  assert not (tmp_path / 'config.json').exists()


# (field, bad value, text the message must hold besides the field)
CONFIG_CASES = [
    ('seed', -1, '-1'),
    ('data.name', 'imagenet', 'embedded'),
    ('data.num_clients', 0, '0'),
    ('data.public_fraction', 0.0, '0.0'),
    ('data.public_fraction', 1.0, '1.0'),
    ('data.client_test_fraction', -0.1, '-0.1'),
    ('data.dirichlet_alpha', 0.0, '0.0'),
    ('data.modality_missing_rate', 1.0, '1.0'),
    ('data.encoders.accel', ('resnet',), 'resnet'),
    ('data.modality_sets', (('accel', 'sonar'), ('depth',), ('depth',)), 'sonar'),
    ('data.modality_sets', (('depth',),), 'one modality tuple per client'),
    ('text.answer_len', 1, '1'),
    ('edge_model.backbone.lora_rank', 0, '0'),
    ('edge_model.backbone.heads', 3, 'divisor'),
    ('server_model.d_z', 0, '0'),
    ('edge_model.backbone.lora_targets', ('qkv', 'conv'), 'conv'),
    ('edge_model.backbone.max_len', 8, '8'),
    ('server_model.backbone.frozen_dtype', 'float16', 'bfloat16'),
    ('train.rounds', -1, '-1'),
    ('train.batch_size', 0, '0'),
    ('train.batch_size', 2.5, '2.5'),
    ('train.eval_every', 0, '0'),
    ('train.client_fraction', 1.5, '1.5'),
    ('train.client_fraction', 0.0, '0.0'),
    ('train.learning_rate', -1.0, '-1.0'),
    ('train.learning_rate', 1e30, '1e+30'),
    ('train.learning_rate', float('nan'), 'nan'),
    ('train.keep_checkpoints', 1, '1'),
    ('train.dropout_rate', 1.0, '1.0'),
    ('train.straggler_rate', -0.5, '-0.5'),
    ('train.deadline', 0.5, '0.5'),
    ('train.straggler_policy', 'wait', 'discount'),
    ('aggregation.rule', 'krum', 'trimmed_mean'),
    ('aggregation.clip_norm', -1.0, '-1.0'),
    ('aggregation.trim_fraction', 0.5, '0.5'),
    ('dp.noise_multiplier', -1.0, '-1.0'),
    ('dp.delta', 0.0, '0.0'),
    ('dp.accountant', 'moments', 'rdp'),
    ('dp.enabled', 'yes', 'True or False'),
    ('method.name', 'nope', 'fedavg'),
    ('method.ccl', 'triplet', 'gram'),
    ('method.mma_backbone', 'median', 'modality_samples'),
    ('method.mma_modality', 'median', 'observations'),
    ('method.lambda_ccl', -0.1, '-0.1'),
    ('method.amt', 1, 'True or False'),
    ('eval.max_test_per_client', 0, '0'),
    ('mesh.num_devices', -1, '-1'),
]


@pytest.mark.parametrize('field,value,text', CONFIG_CASES, ids=[f'{f}={v!r}'[:40] for f, v, _ in CONFIG_CASES])
def test_config_field_is_refused(field, value, text, results):
  cfg = _set(_tiny(), field, value)
  with pytest.raises(ConfigError) as e:
    trainer.train(cfg, str(results), progress=False, log=lambda s: None)
  msg = str(e.value)
  assert field in msg and text in msg and '\n' not in msg, msg


@pytest.mark.parametrize('changes,field', [
    ({'dp.enabled': True, 'aggregation.rule': 'median'}, 'aggregation.rule'),
    ({'dp.enabled': True, 'method.communicate': False}, 'dp.enabled'),
    ({'data.name': 'urfall'}, 'data.path'),
])
def test_inconsistent_fields_are_refused(changes, field, results):
  cfg = _tiny()
  for f, v in changes.items():
    _set(cfg, f, v)
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    trainer.train(cfg, str(results), progress=False, log=lambda s: None)


def test_more_devices_than_visible():
  with pytest.raises(ConfigError, match=r'mesh\.num_devices = 64: expected 0 \(all\) or at most the 1 visible'):
    check_devices(_set(_tiny(), 'mesh.num_devices', 64), 1)


def test_partial_mesh_over_several_processes():
  with pytest.raises(ConfigError, match=r'mesh\.num_devices = 2: expected 0 or 4: with 2 processes'):
    check_devices(_set(_tiny(), 'mesh.num_devices', 2), 4, 2)
  check_devices(_set(_tiny(), 'mesh.num_devices', 4), 4, 2)


@pytest.mark.parametrize('field,value,text', [
    ('train.batch_size', 100000, 'largest client training split'),
    ('data.public_test_fraction', 0.3, 'server test split'),      # with a public fraction of one sequence
    ('data.num_clients', 500, 'two sequences each'),
])
def test_partition_checks(field, value, text, dataset):
  cfg = _set(_tiny(), field, value)
  if field == 'data.public_test_fraction':
    cfg.data.public_fraction = 0.001
  cfg.data.modality_sets = ()
  with pytest.raises(ConfigError, match=text) as e:
    check_partition(validate(cfg), dataset)
  assert field in str(e.value)


# ---------------------------------------------------------------------------- data files
def _urfall_cfg(path):
  cfg = _tiny()
  cfg.data.name = 'urfall'
  cfg.data.path = str(path)
  return cfg


def test_urfall_missing_files_name_the_file(tmp_path, results):
  with pytest.raises(DataError) as e:
    trainer.train(_urfall_cfg(tmp_path / 'nowhere'), str(results), progress=False, log=lambda s: None)
  assert 'nowhere' in str(e.value) and 'data.path' in str(e.value)


def test_npz_missing_file(tmp_path, results):
  cfg = _tiny()
  cfg.data.name, cfg.data.path = 'npz', str(tmp_path / 'absent.npz')
  with pytest.raises(DataError, match='absent.npz'):
    trainer.train(cfg, str(results), progress=False, log=lambda s: None)


def test_npz_malformed_file(tmp_path, results):
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(b'not a zip file at all')
  cfg = _tiny()
  cfg.data.name, cfg.data.path = 'npz', str(bad)
  with pytest.raises(DataError, match='bad.npz'):
    trainer.train(cfg, str(results), progress=False, log=lambda s: None)


def test_npz_without_labels(tmp_path, results):
  path = tmp_path / 'nolabels.npz'
  np.savez(path, accel=np.zeros((10, 4, 3), np.float32))
  cfg = _tiny()
  cfg.data.name, cfg.data.path = 'npz', str(path)
  with pytest.raises(DataError, match='nolabels.npz'):
    trainer.train(cfg, str(results), progress=False, log=lambda s: None)


# ---------------------------------------------------------------------------- checkpoints
def test_corrupt_checkpoint_falls_back_with_a_warning(tmp_path):
  ckpt = Checkpointer(str(tmp_path / 'ckpt'), 3)
  template = {'a': jnp.zeros(3)}
  ckpt.save(1, {'a': jnp.ones(3)}, {'round': 1, 'rows': []})
  ckpt.save(2, {'a': 2 * jnp.ones(3)}, {'round': 2, 'rows': []})
  ckpt.close()
  for root, _, files in os.walk(tmp_path / 'ckpt' / '2'):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  warnings = []
  step, state, _ = Checkpointer(str(tmp_path / 'ckpt'), 3).restore_latest_valid(template, warnings.append)
  assert step == 1 and float(state['a'][0]) == 1.0
  assert warnings and os.path.join('ckpt', '2') in warnings[0]


def test_checkpoint_of_another_structure_is_refused_by_name(tmp_path):
  ckpt = Checkpointer(str(tmp_path / 'ckpt'), 2)
  ckpt.save(1, {'a': jnp.ones(3)}, {'round': 1, 'rows': []})
  ckpt.close()
  with pytest.raises(ValueError, match='does not match this config'):
    Checkpointer(str(tmp_path / 'ckpt'), 2).restore({'a': jnp.zeros(3), 'b': jnp.zeros(2)})


def test_grid_checks_every_cell_before_the_first(tmp_path):
  base = _tiny()
  base.grid = ml_collections.ConfigDict(dict(methods=('fedavg', 'nope'), missing_rates=(0.3,), num_clients=(3,),
                                             partition_seeds=(0,), train_seeds=(0,)))
  ran = []
  with pytest.raises(ConfigError, match="grid.methods.*'nope'"):
    compare.run_grid(base, str(tmp_path), lambda *a: ran.append(a) or True)
  assert not ran and not (tmp_path / 'cells').exists()
  base.grid.methods, base.grid.num_clients = ('fedavg',), (0,)
  with pytest.raises(ConfigError, match=r'data\.num_clients = 0'):
    compare.run_grid(base, str(tmp_path), lambda *a: ran.append(a) or True)
  base.grid.num_clients = (3,)
  for field, bad in (('runs_per_program', 0), ('run_devices', 1.5), ('run_batch', -1)):
    with base.grid.unlocked():
      base.grid[field] = bad
    with pytest.raises(ConfigError, match=rf'grid\.{field}={bad}: expected an integer >= '):
      compare.run_grid(base, str(tmp_path), lambda *a: ran.append(a) or True)
    with base.grid.unlocked():
      del base.grid[field]
  assert not ran


# ---------------------------------------------------------------------------- launchers
def _launch(script, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  res = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=env)
  return res.returncode, res.stdout + res.stderr


@pytest.mark.parametrize('args,text', [
    (['--config.method.name=nope'], 'method.name'),
    (['--config.train.dropout_rate=1.0'], 'train.dropout_rate = 1.0'),
    (['--config.data.name=urfall'], 'data.path'),
    (['--config.text.instr_len=3'], 'text.instr_len too small'),   # found only when the text is tokenised
])
def test_train_launcher_refuses(args, text, results):
  rc, out = _launch('launch/train.py', f'--config={ROOT}/configs/tiny.py', f'--workdir={results}', *args)
  assert rc == 2 and text in out and 'Traceback' not in out, out[-2000:]
  assert [line for line in out.splitlines() if line.startswith('error:')]


def test_compare_launcher_checks_methods_before_any_cell(tmp_path):
  (tmp_path / 'results.csv').write_text(SENTINEL)
  rc, out = _launch('studies/compare/run.py', f'--config={ROOT}/studies/compare/configs/compare.py', f'--workdir={tmp_path}',
                    '--config.grid.methods=fedavg,nope')
  assert rc == 2 and 'nope' in out and 'grid.methods' in out and 'Traceback' not in out, out[-2000:]
  assert (tmp_path / 'results.csv').read_text() == SENTINEL and not (tmp_path / 'cells').exists()


@pytest.mark.parametrize('flag,text', [('--clients=0', 'clients'), ('--steps=0', 'steps'), ('--clients=4,x', 'clients'),
                                       ('--workloads=huge', 'huge')])
def test_bench_launcher_refuses(flag, text, tmp_path):
  out_file = tmp_path / 'RESULTS.md'
  out_file.write_text(SENTINEL)
  rc, out = _launch('benchmarks/throughput.py', flag, f'--out={out_file}')
  assert rc != 0 and text in out and 'Traceback' not in out, out[-2000:]
  assert out_file.read_text() == SENTINEL
