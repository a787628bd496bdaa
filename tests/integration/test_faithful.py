"""A tiny federation with scarce labels (20% of the client rows, none of the public set, half of the
server's), a generic pretraining corpus, one warm-up round without SE-CCL alignment, and global evaluation."""
import copy

import numpy as np
import pytest


@pytest.mark.slow
def test_federation_scarce_labels_warmup_and_global_eval(tiny_config, dataset, tmp_path):
  from ml_ecs.core import federation
  cfg = copy.deepcopy(tiny_config)
  cfg.data.update(dict(label_fraction=0.2, public_labels=False, server_label_fraction=0.5))
  cfg.pretrain.update(dict(corpus='generic', steps=5))
  cfg.method.update(dict(se_ccl_warmup=1, se_ccl_reliability='none'))
  setup, state = federation.init(cfg, dataset=dataset, log=lambda s: None, cache_dir=str(tmp_path))
  c = setup.cohorts[0]
  labelled = np.asarray(c.data.train.answer_mask).sum(-1) > 0
  counts = np.asarray(c.data.train.count)
  assert labelled[0, :counts[0]].mean() == pytest.approx(np.ceil(0.2 * counts[0]) / counts[0])
  assert float(np.asarray(c.data.public.answer_mask).sum()) == 0.0      # public unlabelled for clients
  state, m1 = federation.run_round(setup, state)                        # round 0: warm-up
  assert m1['client/public_lm'] == 0.0 and m1['client/public_se_ccl'] == 0.0 and m1['client/se_ccl_used'] == 0.0
  assert m1['server/se_ccl'] == 0.0 and m1['server/se_ccl_targets'] == 0 and m1['server/se_ccl_clients'] == 0
  state, m2 = federation.run_round(setup, state)                        # round 1: aligned
  assert m2['client/se_ccl_used'] == 1.0 and m2['client/public_se_ccl'] > 0
  assert 0 < m2['server/se_ccl_targets'] <= setup.num_public and m2['server/se_ccl_clients'] == m2['clients/sampled']
  ev = federation.evaluate(setup, state)
  for k in ('client/rougeLsum_multi_mean', 'client/global_rougeLsum_mean', 'client/global_rougeLsum_multi_mean',
            'server/rougeLsum_multi'):
    assert 0.0 <= ev[k] <= 1.0, k
  assert ev['client/rougeLsum_multi_mean'] >= ev['client/rougeLsum_mean'] - 1e-9
