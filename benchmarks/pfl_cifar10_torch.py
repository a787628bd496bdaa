"""pfl itself (pfl 0.6.0, PyTorch backend) on pfl-research's CIFAR-10 benchmark workload.

The same workload, users and arrays as `benchmarks.lib.pfl_cifar10` (our engine): pfl's simple_cnn, 1,000 IID users
x 50 images, cohort 50, 1 local epoch of batch 10 with SGD lr 0.1, central SGD lr 1.0, WeightByUser,
central evaluation every 10 rounds on the 10,000 test images (batch 10,000). Built with pfl's public API the
way its benchmarks/image_classification/pytorch/train.py builds it (SimulatedBackend, FederatedAveraging,
NNAlgorithmParams, CentralEvaluationCallback), with the user data as torch tensors on the GPU
(`pytorch_ops.to_tensor`, as the benchmark does). pfl picks the device itself
(`pfl.internal.ops.pytorch_ops.get_default_device`: $PFL_PYTORCH_DEVICE, else CUDA, else MPS, else CPU); the
script has no device calls of its own, so it runs on CPU where torch sees no GPU.

  python benchmarks/pfl_cifar10_torch.py --rounds=100 --out=/tmp/pfl.json [--small]
  python benchmarks/pfl_cifar10_torch.py --rounds=10 --out=/tmp/pfl.json --data=arrays.npz --threads=2

Data: without --data the script builds the arrays with `benchmarks.lib.pfl_cifar10` (imports jax); with --data it
reads the users' arrays, the test arrays and the config from an .npz written by `benchmarks/pfl_cpu.py`
(no jax needed: the CPU comparison runs pfl in its own venv). Writes a JSON with seconds per round (wall clock
of `algorithm.run`, evaluation included, and the steady-state rate from the per-round times after the first
5 rounds), the end time of every round (`round_end_s`) and the accuracy history. Needs torch and pfl (carried
as wheels to the GPU machine by benchmarks/device_check.sh; a separate venv on CPU, see benchmarks/RESULTS.md).
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')   # jax is imported (numpy helpers), never used
# As sys.path[0] this folder's scripts could shadow packages pfl imports (its many-process benchmark was once
# multiprocess.py, which shadowed the `multiprocess` package of pfl.data.federated_dataset). Drop it; put the
# repository root first instead (ml_ecs, without --data).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--rounds', type=int, default=100)
  ap.add_argument('--out', required=True)
  ap.add_argument('--small', action='store_true', help='20 users x 10 images, cohort 5, 8x8 images')
  ap.add_argument('--time_budget_s', type=float, default=0.0, help='stop early after this many seconds (0: none)')
  ap.add_argument('--data', default='', help='.npz of users_x, users_y, x_test, y_test, cfg (json) instead of ml_ecs')
  ap.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: torch default)')
  args = ap.parse_args()

  import torch
  import torch.nn as nn
  import pfl
  from pfl.aggregate.simulate import SimulatedBackend
  from pfl.aggregate.weighting import WeightByUser
  from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
  from pfl.callback.central_evaluation import CentralEvaluationCallback   # not re-exported by pfl.callback (0.6.0)
  from pfl.callback.base import TrainingProcessCallback
  from pfl.data.dataset import Dataset
  from pfl.data.federated_dataset import FederatedDataset
  from pfl.data.sampling import get_user_sampler
  from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
  from pfl.internal.ops.pytorch_ops import get_default_device, to_tensor
  from pfl.metrics import Metrics, Weighted
  from pfl.model.pytorch import PyTorchModel

  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  np.random.seed(0)
  if args.data:
    with np.load(args.data) as z:
      cfg = json.loads(str(z['cfg']))
      cfg['image'] = tuple(cfg['image'])
      users_x, users_y = z['users_x'], z['users_y']
      data = dict(x_test=z['x_test'], y_test=z['y_test'])
  else:
    from benchmarks.lib import pfl_cifar10 as pc
    cfg = dict(pc.CONFIG)
    if args.small:
      cfg.update(num_users=20, per_user=10, cohort=5, num_test=200, image=(8, 8, 3), eval_every=2)
    data = pc.synthetic_cifar10(cfg['num_users'] * cfg['per_user'], cfg['num_test'], cfg['image'], cfg['classes'])
    users = pc.partition_iid(data['x_train'], data['y_train'], cfg['num_users'], cfg['per_user'])
    users_x, users_y = users.x, users.y

  class SimpleCNN(nn.Module):
    """pfl's compare_utils simple_cnn (TF-style NHWC input transposed), with pfl's loss/metrics hooks."""

    def __init__(self, image, classes):
      super().__init__()
      flat = ((image[0] - 4) // 2) ** 2 * 64
      self.net = nn.Sequential(nn.Conv2d(image[2], 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                               nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(),
                               nn.Dropout(0.5), nn.Linear(128, classes))
      for m in self.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
          nn.init.xavier_uniform_(m.weight)

    def forward(self, x):
      return self.net(x.permute(0, 3, 1, 2))

    def loss(self, x, y, eval=False):
      self.eval() if eval else self.train()
      return nn.functional.cross_entropy(self(x), y.long())

    @torch.no_grad()
    def metrics(self, x, y, eval=True):
      self.eval() if eval else self.train()
      logits = self(x)
      n = len(x)
      loss = nn.functional.cross_entropy(logits, y.long(), reduction='sum').item()
      correct = (logits.argmax(-1) == y.long()).sum().item()
      return {'loss': Weighted(loss, n), 'accuracy': Weighted(correct, n)}

  user_data = {u: [to_tensor(users_x[u]), to_tensor(users_y[u])] for u in range(cfg['num_users'])}
  train = FederatedDataset.from_slices(user_data, get_user_sampler('random', range(cfg['num_users'])))
  val = FederatedDataset.from_slices(dict(user_data), get_user_sampler('random', range(cfg['num_users'])))
  central = Dataset(raw_data=[to_tensor(data['x_test']), to_tensor(data['y_test'])])

  module = SimpleCNN(cfg['image'], cfg['classes'])
  params = [p for p in module.parameters() if p.requires_grad]
  model = PyTorchModel(model=module, local_optimizer_create=torch.optim.SGD,
                       central_optimizer=torch.optim.SGD(params, cfg['central_lr']))
  backend = SimulatedBackend(training_data=train, val_data=val, postprocessors=[WeightByUser()])

  record = dict(engine=f'pfl {pfl.__version__} (PyTorch {torch.__version__} backend)',
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', history=[], rounds=0,
                torch_threads=torch.get_num_threads(), pfl_device=str(get_default_device()))
  times = []
  t_start = [0.0]

  def dump():
    done = record['rounds']
    wall = (times[-1] - t_start[0]) if times else 0.0
    steady = (times[-1] - times[4]) / (len(times) - 5) if len(times) > 6 else None
    record.update(wall_s=wall, s_per_round=wall / max(done, 1), s_per_100_rounds=100 * wall / max(done, 1),
                  steady_s_per_round=steady, round_end_s=[t - t_start[0] for t in times])
    with open(args.out, 'w') as f:
      json.dump(record, f, indent=1)

  class Clock(TrainingProcessCallback):
    def on_train_begin(self, *, model):
      t_start[0] = time.perf_counter()
      return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
      times.append(time.perf_counter())
      record['rounds'] = central_iteration + 1
      acc = [v for k, v in aggregate_metrics.to_simple_dict().items() if 'Central val' in k and 'accuracy' in k]
      if acc:
        record['history'].append(dict(round=central_iteration + 1, accuracy=float(acc[0]), t=times[-1] - t_start[0]))
        print(f'[pfl] round {central_iteration + 1}: central accuracy {float(acc[0]):.4f}', flush=True)
        dump()
      stop = args.time_budget_s > 0 and times[-1] - t_start[0] > args.time_budget_s
      return stop, Metrics()

  algorithm = FederatedAveraging()
  algorithm_params = NNAlgorithmParams(central_num_iterations=args.rounds, evaluation_frequency=cfg['eval_every'],
                                       train_cohort_size=cfg['cohort'], val_cohort_size=0)
  algorithm.run(algorithm_params=algorithm_params, backend=backend, model=model,
                model_train_params=NNTrainHyperParams(local_learning_rate=cfg['local_lr'],
                                                      local_num_epochs=cfg['epochs'], local_batch_size=cfg['batch']),
                model_eval_params=NNEvalHyperParams(local_batch_size=10000),
                callbacks=[CentralEvaluationCallback(central, NNEvalHyperParams(local_batch_size=10000),
                                                     frequency=cfg['eval_every']), Clock()])   # Clock last: sees the evaluation
  if record['history']:
    record['final_accuracy'] = record['history'][-1]['accuracy']
  dump()
  print(json.dumps({k: v for k, v in record.items() if k != 'history'}), flush=True)


if __name__ == '__main__':
  main()
