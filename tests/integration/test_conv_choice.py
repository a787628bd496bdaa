"""A resumed run makes the execution choices its first process recorded (train.conv_impl='auto'), whatever
the autotune cache says now: federation.init(recorded=...), fed by the trainer from model_summary.json."""
import json

import jax
from flax import nnx
from jax import lax

from ml_ecs.core import federation
from ml_ecs.models.conv import matmul_conv
from ml_ecs.run import trainer


def _convs(model) -> set:
  return {node.conv_general_dilated for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Conv)}


def test_recorded_choices_are_made_again(tiny_config, tmp_path):
  cfg = tiny_config.copy_and_resolve_references()
  assert cfg.train.conv_impl == 'auto'
  (tmp_path / 'model_summary.json').write_text(json.dumps({'execution': {'cohort 0': {'conv_impl': 'matmul'},
                                                                          'server': {'conv_impl': 'xla'}}}))
  recorded = trainer._recorded_execution(str(tmp_path))
  setup, state = federation.init(cfg, workdir=str(tmp_path / 'run'), cache_dir=str(tmp_path), log=lambda s: None,
                                 recorded=recorded)
  assert setup.execution['cohort 0'] == {'conv_impl': 'matmul', 'recorded': True}
  assert setup.execution['server'] == {'conv_impl': 'xla', 'recorded': True}
  client = setup.cohorts[0].program.model(jax.tree.map(lambda x: x[0], state.cohorts[0].trainables), setup.edge_frozen)
  server = setup.server_program.model(state.server.trainables, setup.server_frozen)
  assert _convs(client) == {matmul_conv}
  assert _convs(server) == {lax.conv_general_dilated}
  assert 'execution' in federation.model_summary(setup, state)
  assert trainer._recorded_execution(str(tmp_path / 'none')) is None
