"""A user's own npz dataset through the main job; sizing from the config alone against the
run's initialised models; PEFT export from the run's checkpoint and back (ml_ecs.run.export)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('transformers')
pytest.importorskip('safetensors')

from ml_ecs.run import export
from ml_ecs.models import params
from ml_ecs.backbones import peft_io
from ml_ecs.run import sizing  # noqa: E402
from ml_ecs.data.loaders import from_arrays, load_dataset, save_npz  # noqa: E402
from ml_ecs.backbones.hf_gpt2 import load_hf_gpt2  # noqa: E402
from ml_ecs.run.trainer import train  # noqa: E402

CLASSES = ('rest', 'walk', 'jump')
PARAS = (('resting quietly', 'at rest'), ('walking along', 'a slow walk'), ('jumping up', 'a jump'))
# The tests share one run (`npz_run`): one xdist worker makes it.
pytestmark = pytest.mark.xdist_group('workdir_export')


def _user_dataset(n: int = 240, seed: int = 0):
  """Two modalities of the user's own naming and shapes; some imu rows missing (NaN)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, len(CLASSES), n)
  imu = rng.normal(size=(n, 16, 3)).astype(np.float32) + labels[:, None, None]
  imu[rng.random(n) < 0.1] = np.nan
  audio = rng.normal(size=(n, 12)).astype(np.float32) - labels[:, None]
  return from_arrays({'imu': imu, 'audio': audio}, labels, CLASSES, sequence_ids=np.arange(n) // 4,
                     descriptions=PARAS, text_ids=rng.integers(0, 2, n))


def user_config(path: str):
  from configs import tiny
  c = tiny.get_config()
  c.data.update(dict(name='npz', path=path, num_clients=2, modality_sets=(('imu', 'audio'), ('audio',)),
                     public_per_client=16))
  c.data.encoders = {'imu': ('conv1d',), 'audio': ('mlp',)}   # the dataset's modality names
  c.text.update(dict(instruction='what happens?', instr_len=6, answer_len=8))
  c.train.update(dict(rounds=1, checkpoint_every=1))
  c.eval.update(dict(max_test_per_client=4, max_server_test=4))
  return c


@pytest.fixture(scope='module')
def npz_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('npz_run')
  ds = _user_dataset()
  save_npz(ds, tmp / 'mine.npz')
  cfg = user_config(str(tmp / 'mine.npz'))
  workdir = str(tmp / 'run')
  result = train(cfg, workdir, progress=False, log=lambda s: None)
  return cfg, workdir, result


@pytest.mark.slow
def test_main_job_on_user_npz_dataset(npz_run):
  cfg, workdir, result = npz_run
  assert result.status == 'complete' and [r['round'] for r in result.rows] == [0, 1]
  last = result.rows[-1]
  assert np.isfinite(last['client/private_lm']) and 0 <= last['server/rougeLsum'] <= 1
  clients = json.load(open(os.path.join(workdir, 'clients.json')))
  assert [sorted(c['modalities']) for c in clients] == [['audio', 'imu'], ['audio']]
  assert clients[0]['encoders'] == {'imu': 'conv1d', 'audio': 'mlp'}


@pytest.mark.slow
def test_sizing_from_config_matches_initialised_run(npz_run):
  """ml_ecs.run.sizing (nnx.eval_shape, no weights) gives the counts and bytes of the run's real models."""
  cfg, workdir, result = npz_run
  got = sizing.size_config(cfg)
  real = json.load(open(os.path.join(workdir, 'model_summary.json')))
  assert [e['params'] for e in got['edge_cohorts']] == [e['params'] for e in real['edge_cohorts']]
  assert got['server'] == real['server']
  assert got['total_model_bytes'] == real['total_model_bytes']
  trained = result.rows[-1]
  for k in ('comm/bytes_up', 'comm/lora_bytes_up', 'comm/reps_bytes_up', 'comm/bytes_down'):
    assert got['round'][k] == trained[k], k
  assert got['round']['comm/ratio'] == pytest.approx(trained['comm/ratio'])
  assert 'edge shared LoRA / edge model' in sizing.format_sizes(got)


def _logits(program, trainables, frozen, width):
  model = params.merge_model(program.graphdef, {**trainables, 'frozen': frozen})
  x = jax.random.normal(jax.random.key(3), (2, 9, width))
  return np.asarray(model.backbone(x, jnp.ones((2, 9)))[0])


def _zeros(tree):
  return jax.tree.map(jnp.zeros_like, tree)


@pytest.mark.slow
def test_export_peft_from_workdir_round_trip(npz_run, tmp_path):
  """Exported adapters (personalised, shared) imported back give the checkpoint model's logits;
  the base model (our own backbone) is exported beside them and loads back."""
  cfg, workdir, _ = npz_run
  setup, state, step = export.load_run(workdir)
  assert step == 1
  tr, frozen, mcfg, _ = export.node(setup, state, client=0)
  program = setup.cohorts[0].program
  width = mcfg.backbone.width
  want = _logits(program, tr, frozen, width)

  out = str(tmp_path / 'client0')
  info = export.export_node(setup, state, out, client=0, which='personalised')
  blank = {**tr, 'shared': _zeros(tr['shared']), 'private': _zeros(tr['private'])}   # gates 1, no LoRA
  back = peft_io.import_peft(out, blank, mcfg.backbone, which='personalised')
  np.testing.assert_allclose(_logits(program, back, frozen, width), want, atol=1e-5)
  base = load_hf_gpt2(info['base_model'])
  assert base.vocab_size == setup.text.tokenizer.vocab_size
  np.testing.assert_array_equal(base.frozen['wte'], np.asarray(frozen['backbone']['wte'][...]))
  assert json.load(open(os.path.join(out, peft_io.ADAPTER_CONFIG)))['base_model_name_or_path'] == info['base_model']

  shared_only = {**tr, 'private': _zeros(tr['private'])}
  out = str(tmp_path / 'global')
  export.export_node(setup, state, out, client=0, which='shared')
  back = peft_io.import_peft(out, blank, mcfg.backbone, which='shared')
  np.testing.assert_allclose(_logits(program, back, frozen, width),
                             _logits(program, shared_only, frozen, width), atol=1e-5)

  # the server, through the command's function
  out = str(tmp_path / 'server')
  info = export.export_peft_from_workdir(workdir, out, server=True)
  assert info['round'] == '1' and os.path.isfile(os.path.join(out, peft_io.ADAPTER_WEIGHTS))
  assert os.path.isfile(os.path.join(out, export.BASE_DIR, 'model.safetensors'))


@pytest.mark.slow
def test_export_peft_errors(npz_run, tmp_path):
  cfg, workdir, _ = npz_run
  setup, state, _ = export.load_run(workdir)
  with pytest.raises(ValueError, match=r'unknown client id 7: this run has clients 0\.\.1'):
    export.export_node(setup, state, str(tmp_path / 'x'), client=7)
  with pytest.raises(ValueError, match='exactly one node'):
    export.export_peft_from_workdir(workdir, str(tmp_path / 'x'), client=0, server=True)
  with pytest.raises(FileNotFoundError, match='not a workdir'):
    export.export_peft_from_workdir(str(tmp_path), str(tmp_path / 'x'), client=0)
  no_ckpt = tmp_path / 'no_ckpt'
  no_ckpt.mkdir()
  (no_ckpt / 'config.json').write_text(open(os.path.join(workdir, 'config.json')).read())
  with pytest.raises(FileNotFoundError, match='has no checkpoints'):
    export.export_peft_from_workdir(str(no_ckpt), str(tmp_path / 'x'), client=0)
  with pytest.raises(ValueError, match=r'no checkpoint of round 5 .* rounds \[1\]'):
    export.load_run(workdir, step=5)
