"""A tiny federation with client dropout, central DP, a NaN client (re-synced) and all clients NaN
(ml_ecs.core.faults, ml_ecs.aggregation.privacy)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ml_ecs.core import faults
from ml_ecs.aggregation import privacy


@pytest.mark.slow
def test_federation_with_dropout_nan_client_and_dp(tiny_config, dataset, tmp_path):
  """20% dropout over rounds; a NaN client is left out of eval means, reported, re-synced; all-NaN stops."""
  from ml_ecs.core import federation
  from ml_ecs.config.validation import validate
  cfg = ml_collections.ConfigDict(tiny_config.to_dict())
  cfg.train.dropout_rate = 0.2
  cfg.dp.update(dict(enabled=True, noise_multiplier=0.5, clip_norm=1.0))
  validate(cfg)
  setup, state = federation.init(cfg, workdir=str(tmp_path), dataset=dataset, log=lambda s: None,
                                 cache_dir=str(tmp_path))
  dropped = 0
  for r in range(1, 4):
    state, m = federation.run_round(setup, state)
    assert m['faults/survivors'] + m['faults/dropped'] + m['faults/late'] == m['clients/sampled']
    assert m['agg/participants'] == m['faults/survivors'] and m['dp/epsilon'] == privacy.epsilon(cfg.dp, 1.0, r)
    dropped += m['faults/dropped']
  poison = lambda t, rows: jax.tree.map(lambda x: x.at[rows].set(jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating)
                                        else x, t)
  c0 = state.cohorts[0]
  bad_id = int(setup.cohorts[0].client_ids[0])
  state = federation.State((federation.NodeState(poison(c0.trainables, 0), c0.opt_state),) + state.cohorts[1:],
                           state.server, state.global_shared, state.server_z, state.round, state.rng)
  ev = federation.evaluate(setup, state)
  assert ev['client/diverged_ids'] == [bad_id] and str(bad_id) not in ev['client/rougeLsum']
  assert np.isfinite(ev['client/rougeLsum_mean'])
  state, m = federation.run_round(setup, state)
  assert m['clients/resynced_ids'] == [bad_id] and m['clients/diverged_ids'] == []
  assert np.isfinite(m['client/private_lm'])
  assert bool(faults.clients_finite(state.cohorts[0].trainables).all())
  # Every client NaN (after the re-sync of the round's start): the round's check stops the run.
  cohorts = tuple(federation.NodeState(poison(cs.trainables, slice(None)), cs.opt_state) for cs in state.cohorts)
  setup_no_resync = setup.__class__(**{**setup.__dict__, 'cohorts': tuple(
      c.__class__(**{**c.__dict__, 'resync_fn': None}) for c in setup.cohorts)})
  state = federation.State(cohorts, state.server, state.global_shared, state.server_z, state.round, state.rng)
  state, m = federation.run_round(setup_no_resync, state)
  with pytest.raises(faults.FederationDiverged):
    faults.check_round(m)
