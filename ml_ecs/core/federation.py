"""The federation's public face: build it, run its rounds, evaluate and describe it.

  setup, state = federation.init(cfg)            # ml_ecs.core.build
  state, metrics = federation.run_round(setup, state)   # ml_ecs.core.round
  scores = federation.evaluate(setup, state)     # ml_ecs.core.evaluate

`Setup` (ml_ecs.core.setup) is immutable: config, data, tokenizer, mesh, programs, frozen backbones,
cohort data on the devices (or host), compiled functions and the method (`Setup.algorithm`). `State`
(ml_ecs.core.state) is a registered pytree of everything a round changes: per-cohort trainables and
optimizer states, the server's, the global shared LoRA, the server's representations, the round
number, the RNG key and the method's own server state. A method is an `Algorithm`
(ml_ecs.algorithms.base) looked up by `method.name` in ml_ecs.algorithms.registry.
"""
from ml_ecs.core.build import client_mesh, init, make_cohort_round, stack_init  # noqa: F401
from ml_ecs.core.client_store import bucket, gather_clients, pad_positions, scatter_clients  # noqa: F401
from ml_ecs.core.describe import (answer_examples, clients_info, cohort_layout, host_bytes_per_client,  # noqa: F401
                                  model_summary, process_holdings)
from ml_ecs.core.evaluate import (client_answers, eval_blocks, eval_positions, evaluate, floors,  # noqa: F401
                                  server_predictions)
from ml_ecs.core.round import run_round  # noqa: F401
from ml_ecs.core.setup import CohortSetup, Setup  # noqa: F401
from ml_ecs.core.state import CohortRound, NodeState, State  # noqa: F401
