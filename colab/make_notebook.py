"""Writes colab/quickstart.ipynb (outputs stripped) from the cells below: python colab/make_notebook.py

The notebook is code, so it lives here as text and is regenerated, never edited by hand;
tests/integration/test_notebook.py executes it at its default rounds and checks that it learns.
"""
import os

import nbformat

CELLS = [
    ('md', '''# ML-ECS in one notebook

**ML-ECS** trains many heterogeneous **edge clients** (each with its own combination of sensor
modalities, its own encoders and a small language model (SLM) with LoRA) together with a **cloud
server** that runs a larger LM. Only LoRA parameters and *fused representations* cross the network.
The task is text generation: from sensor windows, describe the activity (ROUGE-LSum of the generated
text against a reference description, and accuracy: the class whose sentences the answer matches best).

This notebook builds a federation of four clients on the embedded activity dataset
(`configs/notebook.py`), shows what each of the four components does, trains ML-ECS and FedAvg for
a few rounds and shows what they learned. On 2 CPU cores (Colab's CPU runtime) the whole notebook
takes 3-4 minutes the first time (about half of it compiling and pretraining) and about 1.5 minutes
when run again; a GPU/TPU runtime is used automatically.

**Install.** In a checkout (`colab/` inside the repository) the next cell installs the package with
`pip install -e '..[notebook]'`. On Colab, either upload the wheel (`python setup.py bdist_wheel` in a
checkout writes `dist/ml_ecs-0.1.0-py3-none-any.whl`; upload it to `/content/`) or put the repository
at `/content/ml-ecs` (`git clone <its URL> /content/ml-ecs`, or upload and unzip it); the cell finds
either. Elsewhere: `pip install '<wheel or checkout>[notebook]'`, then open this notebook.'''),
    ('code', '''import glob, importlib.util, os, shutil, subprocess, sys
# On a CPU runtime, XLA compiles with light optimisation: the first round waits about a third less and
# later rounds run a little slower (same results). Left alone when a GPU or TPU is attached.
if not (shutil.which('nvidia-smi') or os.environ.get('COLAB_TPU_ADDR') or os.environ.get('TPU_NAME')):
  os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true')
def pip_install(*args):
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', *args], check=True)
if not all(importlib.util.find_spec(m) for m in ('ml_ecs', 'configs', 'pandas')):
  wheels = sorted(glob.glob('/content/ml_ecs-*.whl'))
  if os.path.exists('../setup.py'):                   # this notebook sits in a checkout
    pip_install('-e', os.path.abspath('..') + '[notebook]')
  elif wheels:                                         # Colab, an uploaded wheel
    pip_install(wheels[-1] + '[notebook]')
  elif os.path.exists('/content/ml-ecs/setup.py'):     # Colab, a cloned or uploaded checkout
    pip_install('-e', '/content/ml-ecs[notebook]')
  else:
    raise SystemExit('no ml-ecs found: upload its wheel to /content/ or put the repository at /content/ml-ecs')
  importlib.invalidate_caches()
ROUNDS = int(os.environ.get('ML_ECS_NOTEBOOK_ROUNDS', '0')) or None   # None: the config's rounds
WORKDIR = os.environ.get('ML_ECS_NOTEBOOK_WORKDIR', '/tmp/ml_ecs_notebook')
# Compiled programs are kept on disk: running the notebook again skips most of its first-round wait.
from ml_ecs.run.compilation_cache import enable_compilation_cache
enable_compilation_cache(os.environ.get('JAX_COMPILATION_CACHE_DIR', os.path.join(WORKDIR, 'jax_cache')))'''),
    ('md', '''## The model and the federation

Every node is **M = {E, C, B}**: encoders **E** (one per modality it has; architectures differ
between clients), a connector **C** (fuses the modality embeddings into the fused
representation **z**, then maps z to a few soft-prompt tokens) and a backbone **B** (a frozen
GPT-2-style decoder with LoRA, pretrained on the answer sentences, so it knows the language of the
answers but not which answer fits which sensor window). Clients with the same modalities and encoders
form a **cohort**: their parameters are stacked on a leading axis and one jitted `vmap` trains them all.

Each row below is a client: its modalities, encoders and sample counts. No client holds all three
modalities; the server holds all of them.'''),
    ('code', '''import time
import jax
import pandas as pd
from configs import notebook
from ml_ecs.algorithms.registry import apply_strategy
from ml_ecs.core import federation
from ml_ecs.run import plots

T0 = time.time()
cfg = notebook.get_config()
if ROUNDS:
  cfg.train.rounds = ROUNDS
print('devices:', jax.devices(), '| rounds:', cfg.train.rounds)
setup, state = federation.init(apply_strategy(cfg, 'ml_ecs'), workdir=WORKDIR, log=lambda s: None)
clients = federation.clients_info(setup)
pd.DataFrame([{'client': c['client_id'], 'modalities': ' + '.join(c['modalities']),
               'encoders': ', '.join(f'{m}: {e}' for m, e in c['encoders'].items()), 'cohort': c['cohort'],
               'train': c['num_train'], 'test': c['num_test'], 'public': c['num_public']} for c in clients])'''),
    ('code', '''plots.plot_modality_heatmap(clients, setup.modalities);'''),
    ('md', '''## CCL: cross-modal contrastive learning

Inside a client, CCL pulls the embeddings of one sample's modalities (and of its answer text) together
in a shared latent space. The default, GRAM, measures the volume spanned by a sample's unit-norm
embeddings: small when they agree. Missing modalities are masked out, never zero-filled.
The numbers: the loss for embeddings that agree is much lower than for unrelated ones, so minimising
it aligns the modalities.'''),
    ('code', '''import jax.numpy as jnp
from ml_ecs.losses.ccl import ccl_loss
key1, key2 = jax.random.split(jax.random.key(0))
aligned = jax.random.normal(key1, (8, 1, 16)) + 0.05 * jax.random.normal(key2, (8, 3, 16))
unrelated = jax.random.normal(key2, (8, 3, 16))
mask = jnp.ones((8, 3))
pd.DataFrame({'GRAM CCL loss': {'3 modalities that agree': float(ccl_loss('gram', aligned, mask, 0.2)),
                                '3 unrelated modalities': float(ccl_loss('gram', unrelated, mask, 0.2))}})'''),
    ('md', '''## AMT: adaptive multimodal tuning

Each client's backbone carries a **shared** LoRA (aggregated by the server) and a **private** LoRA
(never leaves the device), mixed by learned per-layer gates. Every round a client runs a *public
stage* on the public data (LM loss + SE-CCL; encoders frozen) and a *private stage* on its own data
(LM loss + CCL; everything trainable). The table: each stage's steps per round, what it trains and
its loss weights.'''),
    ('code', '''pd.DataFrame([{'stage': name, 'steps per round': st.steps, 'trains': ', '.join(st.parts),
               'CCL weight': st.lambda_ccl, 'SE-CCL weight': st.lambda_se_ccl,
               'learning rate': st.learning_rate or cfg.train.learning_rate}
              for name, st in (('client public', setup.stages.public), ('client private', setup.stages.private),
                               ('server', setup.stages.server))])'''),
    ('md', '''## MMA: modality-aware model aggregation

The server averages the clients' shared LoRA with weights (`method.mma_backbone`: by samples here),
and averages each modality's parameters only over the clients that hold that modality. The
table: each client's weight in the backbone average (they sum to 1).'''),
    ('code', '''pd.DataFrame({'client': [c['client_id'] for c in clients],
              'modalities': [' + '.join(c['modalities']) for c in clients],
              'train samples': [c['num_train'] for c in clients],
              'MMA weight': setup.weights / setup.weights.sum()})'''),
    ('md', '''## SE-CCL: SLM-enhanced contrastive learning between cloud and edge

On the public data both sides see, the server sends its fused representations down and each client
aligns its own to them (positives = same sample); the clients send theirs up and the server aligns to
their weighted mean. Each side aligns only to a side whose LM loss on a held-out public split is no
worse than its own. Now train ML-ECS (each round: broadcast, cohort updates, MMA, server with SE-CCL
targets). The lines: the clients' and server's LM loss on their training batches, and from the
evaluated rounds on, the clients' mean accuracy on their own test windows.'''),
    ('code', '''def run(setup, state):
  rows = [federation.evaluate(setup, state)]
  for r in range(1, setup.cfg.train.rounds + 1):
    state, row = federation.run_round(setup, state)
    line = f"round {r}: client LM {row['client/private_lm']:.3f}, server LM {row['server/lm']:.3f}"
    if r % setup.cfg.train.eval_every == 0 or r == setup.cfg.train.rounds:
      row.update(federation.evaluate(setup, state))
      line += f", client accuracy {row['client/accuracy_mean']:.3f}"
    rows.append(row)
    print(line)
  return state, rows

state, rows_ml_ecs = run(setup, state)'''),
    ('md', '''## The same federation with FedAvg

FedAvg over the LoRA: one shared adapter, sample weights, LM loss only (no CCL, AMT, MMA or
SE-CCL); same data, models, server, steps and rounds.'''),
    ('code', '''setup_fa, state_fa = federation.init(apply_strategy(cfg, 'fedavg'), workdir=WORKDIR, log=lambda s: None)
state_fa, rows_fedavg = run(setup_fa, state_fa)'''),
    ('md', '''## Results

What the models learned, against what answering without looking at the sensors would score: the
**floors** are every client (and the server) always answering "the", or always answering the
sentence of the class most frequent in its own training data. A model is learning only when it is
above both.'''),
    ('code', '''last = lambda rows: [r for r in rows if 'server/rougeLsum' in r][-1]
floors = federation.floors(setup)
table = [{'model': name, 'client accuracy': last(rows)['client/accuracy_mean'],
          'client ROUGE-LSum (multi-ref)': last(rows)['client/rougeLsum_multi_mean'],
          'server accuracy': last(rows)['server/accuracy'],
          'server ROUGE-LSum (multi-ref)': last(rows)['server/rougeLsum_multi']}
         for name, rows in (('ML-ECS', rows_ml_ecs), ('FedAvg', rows_fedavg))]
table += [{'model': f'floor: always {label}', 'client accuracy': floors[f'floor/client/{a}_accuracy'],
           'client ROUGE-LSum (multi-ref)': floors[f'floor/client/{a}_rougeLsum_multi'],
           'server accuracy': floors[f'floor/server/{a}_accuracy'],
           'server ROUGE-LSum (multi-ref)': floors[f'floor/server/{a}_rougeLsum_multi']}
          for a, label in (('the', '"the"'), ('majority', 'its majority class'))]
pd.DataFrame(table).set_index('model').round(3)'''),
    ('md', '''**ML-ECS vs FedAvg.** Both learn here; the gap between them after a few rounds of one
federation and one seed is not evidence either way (it moves with the seeds by more than it
measures). Whether ML-ECS helps is the question of the comparison study: many partitions and
training seeds, intervals and pre-registered contrasts (`studies/compare/`, its reading in
`docs/results.md`).

Curves per evaluated round (ML-ECS, then FedAvg), per-client final scores coloured by modality set,
bytes per round (LoRA vs representations) and the CCL / SE-CCL losses:'''),
    ('code', '''plots.plot_curves(rows_ml_ecs); plots.plot_curves(rows_fedavg);'''),
    ('code', '''plots.plot_clients(rows_ml_ecs, clients);'''),
    ('code', '''plots.plot_communication(rows_ml_ecs);'''),
    ('code', '''plots.plot_losses(rows_ml_ecs);'''),
    ('md', '''What the ML-ECS clients answer: for each class, one test window's generated answer beside its
reference (`paraphrase`: the answer is word for word one of the class's sentences), and the share of
all client answers that are such a sentence of the right class.'''),
    ('code', '''answers = pd.DataFrame(federation.client_answers(setup, state))
print(f"{answers['paraphrase'].mean():.0%} of {len(answers)} client answers are a sentence of the right class")
answers.sort_values('paraphrase', ascending=False).groupby('class').head(1).set_index('class')[
    ['client_id', 'generated', 'reference', 'paraphrase']]'''),
    ('md', '''And the server, on its public test split:'''),
    ('code', '''server_answers = pd.DataFrame(federation.answer_examples(setup, state))
server_answers.set_index('class')'''),
    ('md', '''The key numbers, also written to `WORKDIR/notebook_summary.json` (tests/integration/test_notebook.py
reads them to check that this notebook learns):'''),
    ('code', '''import json
final = lambda rows, key: last(rows)[key]
summary = {'rounds': cfg.train.rounds, 'floors': floors, 'wall_s': round(time.time() - T0, 1),
           'classes': sorted(set(answers['class']) | set(server_answers['class'])),
           'classes_answered_exactly': sorted(set(answers[answers['paraphrase']]['class'])
                                              | set(server_answers[server_answers['paraphrase']]['class'])),
           **{name: {'client_lm': [r['client/private_lm'] for r in rows[1:]],
                     'client_accuracy': final(rows, 'client/accuracy_mean'),
                     'client_rougeLsum_multi': final(rows, 'client/rougeLsum_multi_mean'),
                     'server_accuracy': final(rows, 'server/accuracy')}
              for name, rows in (('ml_ecs', rows_ml_ecs), ('fedavg', rows_fedavg))}}
with open(os.path.join(WORKDIR, 'notebook_summary.json'), 'w') as f:
  json.dump(summary, f, indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != 'floors'}, indent=1))
print(f'notebook wall time: {time.time() - T0:.0f} s')'''),
    ('md', '''## Where to go next

- The main job: `python launch/train.py --config=configs/default.py --workdir=/tmp/ml_ecs`
  (8 clients, 30 rounds, checkpoints and exact resume; `tensorboard --logdir /tmp/ml_ecs/tensorboard`;
  `python launch/report.py --workdir=/tmp/ml_ecs` draws these plots for any run). This notebook's
  federation as a main job: `--config=configs/notebook.py`.
- The comparison of baselines and ablations: `python studies/compare/run.py --config=studies/compare/configs/compare.py --workdir=/tmp/compare`.
- Your own data: `ml_ecs.data.loaders.from_arrays(...)` and `federation.init(cfg, dataset=ds)`, or the
  `npz` / `hf` / `tfds` sources of `data.name` (see docs/own_data.md).
- The throughput benchmark: `python benchmarks/throughput.py`.'''),
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
