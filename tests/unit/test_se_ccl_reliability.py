"""SE-CCL's reliability rule compares like with like (issue 21): every node's LM loss on the same public
hold-out, which no node trains on, and the rule fires in both directions."""
import copy

import jax.numpy as jnp
import numpy as np

from ml_ecs.algorithms.ml_ecs import se_ccl
from ml_ecs.data.cohort_data import holdout_split
from ml_ecs.data.partition import partition
from ml_ecs.data.text import build_task_text


def test_public_holdout_is_held_out_of_all_training(tiny_config, dataset):
  part = partition(dataset, tiny_config.data)
  hold = set(part.public_holdout_idx.tolist())
  assert hold, 'configs/default.py holds part of the public split out (data.public_holdout_fraction)'
  trained = set(part.public_train_idx.tolist()) | set(part.public_test_idx.tolist())
  for c in part.clients:
    trained |= set(c.train_idx.tolist()) | set(c.public_idx.tolist()) | set(c.test_idx.tolist())
  assert not hold & trained
  # whole recordings: no sequence of the hold-out is elsewhere
  assert not set(dataset.sequence_ids[list(hold)]) & set(dataset.sequence_ids[list(trained)])
  # without the field (configs saved before it): no hold-out, the rest of the partition as before
  cfg = copy.deepcopy(tiny_config.data)
  cfg.public_holdout_fraction = 0.0
  old = partition(dataset, cfg)
  assert not len(old.public_holdout_idx)
  np.testing.assert_array_equal(np.sort(np.concatenate([part.public_train_idx, part.public_holdout_idx])),
                                np.sort(old.public_train_idx))


def test_client_and_server_measure_on_the_same_labelled_samples(tiny_config, dataset):
  part = partition(dataset, tiny_config.data)
  text = build_task_text(dataset, tiny_config.text)
  server = holdout_split(dataset, text, dataset.modality_names, part.public_holdout_idx)
  client = holdout_split(dataset, text, ('depth',), part.public_holdout_idx)
  assert client.inputs.keys() == {'depth'} and server.inputs.keys() == set(dataset.modality_names)
  np.testing.assert_array_equal(client.answers, server.answers)            # same samples, same answers
  assert float(client.answer_mask.sum()) == float(server.answer_mask.sum()) > 0   # all labelled
  own = {'training': 'split'}
  assert se_ccl.reliability_split(server, own) is server and se_ccl.reliability_split(None, own) is own


def test_reliability_rule_fires_in_both_directions():
  """A constructed round: client 0 is better than the server on the hold-out (loss 1.0 < 2.0), client 1
  worse (3.0). The server uses client 0's upload only; only client 1 aligns to the server."""
  server_loss, client_loss, mma = jnp.float32(2.0), jnp.array([1.0, 3.0]), jnp.array([0.5, 0.5])
  up = se_ccl.upload_weights(mma, client_loss, server_loss, 1.0, True)
  np.testing.assert_allclose(up, [0.5, 0.0])                                # server <- better client
  down = [float(se_ccl.client_target_weight(c, server_loss, 1.0, True)) for c in client_loss]
  assert down == [0.0, 1.0]                                                 # worse client <- server
  # before the warm-up nothing fires; without reliability weighting everything does
  assert float(se_ccl.upload_weights(mma, client_loss, server_loss, 0.0, True).sum()) == 0.0
  np.testing.assert_allclose(se_ccl.upload_weights(mma, client_loss, server_loss, 1.0, False), mma)
