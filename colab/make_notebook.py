"""Writes colab/quickstart.ipynb (outputs stripped) from the cells below: python colab/make_notebook.py

The notebook is code, so it lives here as text and is regenerated, never edited by hand;
tests/integration/test_notebook.py executes it (with ML_ECS_NOTEBOOK_ROUNDS=1) so it cannot rot.
"""
import os

import nbformat

CELLS = [
    ('md', '''# ML-ECS in one notebook

**ML-ECS** (arXiv 2602.14107) trains many heterogeneous **edge clients** — each with its own
combination of sensor modalities, its own encoders and a small language model (SLM) with LoRA —
together with a **cloud server** that runs a larger LM. Only LoRA parameters and *fused
representations* cross the network. The task is text generation: from sensor windows, describe
the activity (ROUGE-LSum of the generated text against a reference description, plus accuracy).

This notebook builds a small federation on the embedded activity dataset, shows what each of
the four components does, trains ML-ECS and FedAvg for a few rounds, and plots the results.
It runs on the Colab CPU runtime in a few minutes (a GPU/TPU runtime is used automatically).'''),
    ('code', '''# Install: from a local checkout if this notebook sits in one, else from the repository.
import os, subprocess, sys
here = os.path.abspath('..') if os.path.exists('../setup.py') else None
if here is None and not os.path.exists('/content/ml-ecs'):
  # On Colab: clone or upload the repository to /content/ml-ecs first (or pip install a git URL).
  raise SystemExit('put the ml-ecs repository at /content/ml-ecs (git clone or upload) and rerun')
repo = here or '/content/ml-ecs'
try:
  import ml_ecs  # noqa: F401  (already installed, e.g. the test environment)
except ImportError:
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-e', repo], check=True)
ROUNDS = int(os.environ.get('ML_ECS_NOTEBOOK_ROUNDS', '6'))   # CI runs it with 1
WORKDIR = os.environ.get('ML_ECS_NOTEBOOK_WORKDIR', '/tmp/ml_ecs_notebook')'''),
    ('md', '''## The model and the federation

Every node is **M = {E, C, B}**: encoders **E** (one per modality it has; architectures differ
between clients), a connector **C** (fuses the modality embeddings into the fused
representation **z**, then maps z to a few soft-prompt tokens) and a backbone **B** (a frozen
GPT-2-style decoder with LoRA). Clients with the same modalities and encoders form a **cohort**:
their parameters are stacked on a leading axis and one jitted `vmap` trains them all.'''),
    ('code', '''import jax
import pandas as pd
from configs import tiny
from ml_ecs.core import federation
from ml_ecs.run import plots
from ml_ecs.algorithms.registry import apply_strategy

cfg = tiny.get_config()
cfg.data.num_clients = 4
cfg.data.modality_sets = (('accel', 'depth', 'image'), ('accel', 'depth'), ('depth', 'image'), ('depth',))
cfg.train.rounds = ROUNDS
print('devices:', jax.devices())
setup, state = federation.init(apply_strategy(cfg, 'ml_ecs'), workdir=WORKDIR)
clients = federation.clients_info(setup)
pd.DataFrame(clients)'''),
    ('code', '''plots.plot_modality_heatmap(clients, setup.modalities);'''),
    ('md', '''## CCL: cross-modal contrastive learning

Inside a client, CCL pulls the embeddings of one sample's modalities together in a shared
latent space (default: the GRAM volume loss — the volume spanned by a sample's unit-norm
modality embeddings is small when they agree). Missing modalities are masked out, never
zero-filled. It is part of every client's **private stage**, weighted by `method.lambda_ccl`.'''),
    ('code', '''import jax.numpy as jnp
from ml_ecs.losses.ccl import ccl_loss
key = jax.random.key(0)
aligned = jax.random.normal(key, (8, 1, 16)) + 0.05 * jax.random.normal(key, (8, 3, 16))
random = jax.random.normal(key, (8, 3, 16))
mask = jnp.ones((8, 3))
print('GRAM CCL, aligned modalities:', float(ccl_loss('gram', aligned, mask, 0.2)),
      '| unrelated modalities:', float(ccl_loss('gram', random, mask, 0.2)))'''),
    ('md', '''## AMT: adaptive multimodal tuning

Each client's backbone carries a **shared** LoRA (aggregated by the server) and a **private**
LoRA (never leaves the device), mixed by learned per-layer gates. Every round a client runs a
*public stage* (on the public data: LM loss + SE-CCL; encoders frozen) and a *private stage*
(on its own data: LM loss + CCL; everything trainable). Encoders and connector stay private.'''),
    ('code', '''print('public stage :', setup.stages.public)
print('private stage:', setup.stages.private)
print('server stage :', setup.stages.server)'''),
    ('md', '''## MMA: modality-aware model aggregation

The server averages the clients' shared LoRA with weights that count modalities and samples,
and averages each modality's adapter only over the clients that have that modality. The
weights of this federation:'''),
    ('code', '''pd.DataFrame({'client': [c['client_id'] for c in clients],
              'modalities': ['+'.join(c['modalities']) for c in clients],
              'train samples': [c['num_train'] for c in clients],
              'MMA weight': setup.weights / setup.weights.sum()})'''),
    ('md', '''## SE-CCL: SLM-enhanced contrastive learning between cloud and edge

On the public data both sides see, the server sends its fused representations down and each
client aligns its own to them (positives = same sample); the clients send theirs up and the
server aligns to their weighted mean. Now train ML-ECS for a few rounds (each round: broadcast
→ cohort updates → MMA → server with SE-CCL targets):'''),
    ('code', '''def run(setup, state, rounds):
  rows = [federation.evaluate(setup, state)]
  for r in range(1, rounds + 1):
    state, row = federation.run_round(setup, state)
    if r % 2 == 0 or r == rounds:
      row.update(federation.evaluate(setup, state))
    rows.append(row)
    print(f"round {r}: client LM {row['client/private_lm']:.3f}, server LM {row['server/lm']:.3f}")
  return state, rows

state, rows_ml_ecs = run(setup, state, ROUNDS)'''),
    ('md', '''## The same federation with FedAvg

FedAvg over the LoRA: one shared adapter, sample weights, LM loss only (no CCL, AMT, MMA or
SE-CCL); same data, models, steps and rounds.'''),
    ('code', '''setup_fa, state_fa = federation.init(apply_strategy(cfg, 'fedavg'), workdir=WORKDIR, log=lambda s: None)
state_fa, rows_fedavg = run(setup_fa, state_fa, ROUNDS)'''),
    ('md', '''## Results

Client mean and server ROUGE-LSum and accuracy per evaluated round (solid: ML-ECS; the second
figure: FedAvg), per-client final scores coloured by modality set, bytes per round (LoRA vs
representations) and the CCL / SE-CCL losses.'''),
    ('code', '''plots.plot_curves(rows_ml_ecs); plots.plot_curves(rows_fedavg);'''),
    ('code', '''plots.plot_clients(rows_ml_ecs, clients);'''),
    ('code', '''plots.plot_communication(rows_ml_ecs);'''),
    ('code', '''plots.plot_losses(rows_ml_ecs);'''),
    ('code', '''last = lambda rows: [r for r in rows if 'server/rougeLsum' in r][-1]
pd.DataFrame([{'method': name, 'client ROUGE-LSum': last(rows)['client/rougeLsum_mean'],
               'server ROUGE-LSum': last(rows)['server/rougeLsum'],
               'client accuracy': last(rows)['client/accuracy_mean'], 'server accuracy': last(rows)['server/accuracy']}
              for name, rows in (('ml_ecs', rows_ml_ecs), ('fedavg', rows_fedavg))])'''),
    ('md', '''One generated answer per class (the server, on its public test split), beside its reference:'''),
    ('code', '''pd.DataFrame(federation.answer_examples(setup, state))'''),
    ('md', '''## Where to go next

- The main job: `python launch/train.py --config=configs/default.py --workdir=/tmp/ml_ecs`
  (8 clients, 30 rounds, checkpoints and exact resume; `tensorboard --logdir /tmp/ml_ecs/tensorboard`;
  `python launch/report.py --workdir=/tmp/ml_ecs` draws these plots for any run).
- The comparison grid of baselines and ablations: `python studies/compare/run.py --config=studies/compare/configs/compare.py --workdir=/tmp/compare`.
- Your own data: `ml_ecs.data.loaders.from_arrays(...)` and `federation.init(cfg, dataset=ds)`, or the
  `npz` / `hf` / `tfds` sources of `data.name` (see docs/own_data.md).
- The scale benchmark: `python benchmarks/throughput.py`.'''),
]


def build() -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata.update({'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
                      'language_info': {'name': 'python'}, 'colab': {'provenance': []}})
  nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == 'md' else nbformat.v4.new_code_cell(src)
              for kind, src in CELLS]
  return nb


if __name__ == '__main__':
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'quickstart.ipynb')
  nbformat.write(build(), path)
  print('wrote', path)
