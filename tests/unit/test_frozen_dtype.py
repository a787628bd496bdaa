"""Frozen backbones held in bfloat16 (`backbone.frozen_dtype`): half the bytes, computed with in float32,
logits within a stated bound of float32's; and the field does not move the identity of older runs."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ml_ecs.config.identity import identity
from ml_ecs.models import params
from ml_ecs.models.variables import Frozen
from ml_ecs.run import trainer
from studies.compare import grid
from tests.unit.test_faithful import SHAPES, _batch, _model, _parts, _program

MODS = tuple(SHAPES)
ENCODERS = {'accel': 'conv1d', 'depth': 'mlp', 'image': 'mlp'}
# bfloat16 keeps 8 significant bits (relative rounding error <= 2**-9 per weight); through the tiny
# decoder the logits move by well under 1% of their range (measured 1.7e-3 of it).
LOGIT_BOUND = 0.01


def _logits(program, tr, frozen, batch):
  m = program.model(tr, frozen)
  _, z = program.encode(m, batch.inputs, batch.mod_mask)
  instr, instr_mask = program.instructions(z.shape[0])
  return m(z, instr, instr_mask, batch.answers, batch.answer_mask)


def test_bfloat16_frozen_backbone_halves_its_bytes_and_keeps_the_logits(tiny_config):
  model = _model(tiny_config, MODS, ENCODERS, 0)
  program = _program(model)
  tr, frozen = _parts(model)
  held = params.store_frozen(frozen, 'bfloat16')
  assert {x.dtype for x in jax.tree.leaves(held)} == {jnp.dtype(jnp.bfloat16)}
  assert 2 * params.count(held)[1] == params.count(frozen)[1]
  assert params.store_frozen(frozen, 'float32') is frozen
  # The model computes with float32 weights (cast inside the program), not bfloat16 activations.
  merged = jax.tree.leaves(jax.eval_shape(lambda: nnx.state(program.model(tr, held), Frozen)))
  assert {x.dtype for x in merged} == {jnp.dtype(jnp.float32)}
  batch = _batch(MODS, b=8)
  ref, low = _logits(program, tr, frozen, batch), _logits(program, tr, held, batch)
  assert low.dtype == jnp.float32
  rel = float(jnp.abs(low - ref).max() / jnp.abs(ref).max())
  print(f'max |logit difference| / max |logit| = {rel:.2e}')
  assert 0 < rel <= LOGIT_BOUND, f'max |logit difference| / max |logit| = {rel:.2e}'
  loss_ref, loss_low = program.split_lm(tr, frozen, batch), program.split_lm(tr, held, batch)
  np.testing.assert_allclose(float(loss_low), float(loss_ref), rtol=LOGIT_BOUND)


def test_frozen_dtype_at_float32_keeps_the_identity_of_runs_written_before_it(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  saved = trainer.config_dict(cfg)                      # a config.json written before the field existed
  for name in ('edge_model', 'server_model'):
    del saved[name]['backbone']['frozen_dtype']
  assert trainer.config_differences(identity(saved), identity(trainer.config_dict(cfg))) == []
  old = cfg.copy_and_resolve_references()
  with old.ignore_type():
    for name in ('edge_model', 'server_model'):
      del old[name].backbone['frozen_dtype']
  assert grid.config_hash(old) == grid.config_hash(cfg)
  cfg.server_model.backbone.frozen_dtype = 'bfloat16'   # another run: refused on resume, another cell
  assert trainer.config_differences(identity(saved), identity(trainer.config_dict(cfg))) == [
      'server_model.backbone.frozen_dtype']
  assert grid.config_hash(old) != grid.config_hash(cfg)
