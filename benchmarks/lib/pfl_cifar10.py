"""pfl-research's CIFAR-10 benchmark workload (publications/pfl of apple/pfl-research, the
`benchmarks/image_classification` baseline config), run as plain FedAvg on our cohort engine
(`benchmarks.lib.fedavg`).

Workload: CIFAR-10 train split (50,000 images 32x32x3, per-channel normalised) over 1,000 IID users of
50 images each (pfl's `make_iid_federated_dataset` with a constant 50 datapoints per user), 50 users
sampled per round, 1 local epoch of batch 10 (5 local SGD steps, lr 0.1), server SGD lr 1.0 on the
averaged update with every user weighted 1 (`WeightByUser`), 1,500 rounds, central evaluation on the
10,000 test images every 10 rounds. Model: pfl's `simple_cnn` (compare_utils): conv3x3(32) - ReLU -
conv3x3(64) - ReLU - maxpool 2 - dropout 0.25 - dense 128 - ReLU - dropout 0.5 - dense 10, Glorot-uniform
weights.

Data: real CIFAR-10 cannot be read on our machines (no dataset hub, no local copy), so `synthetic_cifar10`
makes arrays of the same shapes, sizes and dtypes (timing does not depend on pixel values) with a learnable
class signal (a fixed random template per class plus noise), so accuracy is a sanity check, not a
CIFAR-10 result. `benchmarks/pfl_cifar10_torch.py` runs pfl itself on the same arrays.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from benchmarks.lib import op_profile
from benchmarks.lib.fedavg import ClientData, FedAvg
from benchmarks.lib.xla_stats import xla_flops
from ml_ecs.core import autotune
from ml_ecs.core.build import client_mesh
from ml_ecs.core.cohort_map import CLIENT_AXIS, cohort_map
from ml_ecs.models.conv import CONV_IMPLS, conv_function

CONFIG = dict(num_users=1000, per_user=50, cohort=50, epochs=1, batch=10, local_lr=0.1, central_lr=1.0, rounds=1500,
              eval_every=10, num_test=10000, image=(32, 32, 3), classes=10)


# ---------------------------------------------------------------------------- model (pure functions)
def init_cnn(key: jax.Array, image=(32, 32, 3), classes: int = 10) -> dict:
  """pfl's simple_cnn parameters (HWIO kernels, Glorot-uniform weights, zero biases)."""
  flat = ((image[0] - 4) // 2) ** 2 * 64
  shapes = {'conv1': (3, 3, image[2], 32), 'conv2': (3, 3, 32, 64), 'dense1': (flat, 128), 'dense2': (128, classes)}
  keys = jax.random.split(key, len(shapes))
  out = {}
  for k, (name, shape) in zip(keys, shapes.items()):
    out[name] = {'w': jax.nn.initializers.glorot_uniform()(k, shape, jnp.float32),
                 'b': jnp.zeros(shape[-1:], jnp.float32)}
  return out


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Inverted dropout. When the keep probability is a multiple of 1/256 (pfl's 0.75 and 0.5), a unit is kept
  when one random byte is below keep * 256, an exact Bernoulli draw from a quarter of the random words that
  `jax.random.bernoulli` uses (XLA:CPU makes them at about 5 ns a word: in a profile of the round, the masks'
  words were about 8% of a local step's operator time); other rates use `jax.random.bernoulli`."""
  keep = 1.0 - rate
  level = keep * 256
  if level == int(level) and 0 < level < 256:
    words = jax.random.bits(key, (-(-x.size // 4),), jnp.uint32)
    byte = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[:x.size].reshape(x.shape)
    kept = byte < np.uint8(level)
  else:
    kept = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(kept, x / keep, 0.0)


def max_pool2(h: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2 (VALID), as a max over a reshape: the same values as `lax.reduce_window`,
  and a gradient of compares where reduce_window's select-and-scatter is slow on XLA:CPU (about 1.2x on a
  local step of this CNN, measured in one run; the gradients differ only on exact ties)."""
  n, hh, ww, c = h.shape
  return h[:, :hh // 2 * 2, :ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))


def cnn_apply(params: dict, x: jax.Array, rng: jax.Array | None = None, conv_impl: str = 'xla') -> jax.Array:
  """Logits [B, classes] of images [B, H, W, C]; dropout only when `rng` is given (training); convolutions
  through `conv_impl` (ml_ecs.models.conv)."""
  conv_fn = conv_function(conv_impl)
  conv = lambda h, p: conv_fn(h, p['w'], (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['b']
  h = jax.nn.relu(conv(x, params['conv1']))
  h = jax.nn.relu(conv(h, params['conv2']))
  h = max_pool2(h)
  k1 = k2 = None
  if rng is not None:
    k1, k2 = jax.random.split(rng)
    h = dropout(h, 0.25, k1)
  h = h.reshape(h.shape[0], -1)
  h = jax.nn.relu(h @ params['dense1']['w'] + params['dense1']['b'])
  if rng is not None:
    h = dropout(h, 0.5, k2)
  return h @ params['dense2']['w'] + params['dense2']['b']


def loss_fn(params, batch, rng, conv_impl: str = 'xla'):
  """Mean cross-entropy over the batch's valid rows (pfl: torch CrossEntropyLoss, mean over the batch)."""
  x, y, mask = batch
  logits = cnn_apply(params, x, rng, conv_impl)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  mask = mask.astype(ce.dtype)
  n = jnp.maximum(mask.sum(), 1.0)
  acc = ((jnp.argmax(logits, -1) == y) * mask).sum() / n
  return (ce * mask).sum() / n, {'accuracy': acc}


# ---------------------------------------------------------------------------- data
def synthetic_cifar10(num_train: int = 50000, num_test: int = 10000, image=(32, 32, 3), classes: int = 10,
                      seed: int = 0) -> dict[str, np.ndarray]:
  """CIFAR-10-shaped float32 images (normalised scale) and int32 labels with a learnable class signal."""
  rng = np.random.default_rng(seed)
  templates = rng.standard_normal((classes, *image)).astype(np.float32)

  def make(n):
    y = rng.integers(0, classes, n).astype(np.int32)
    x = 0.6 * rng.standard_normal((n, *image), dtype=np.float32) + 0.8 * templates[y]
    return x.astype(np.float32), y
  x_train, y_train = make(num_train)
  x_test, y_test = make(num_test)
  return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def partition_iid(x: np.ndarray, y: np.ndarray, num_users: int, per_user: int, seed: int = 0) -> ClientData:
  """pfl's IID users: a random permutation of the rows cut into consecutive slices of `per_user`."""
  order = np.random.default_rng(seed).permutation(len(x))[:num_users * per_user]
  return ClientData(x[order].reshape(num_users, per_user, *x.shape[1:]), y[order].reshape(num_users, per_user),
                    np.full((num_users,), per_user, np.int32))


# ---------------------------------------------------------------------------- the run
def make_fedavg(cfg: dict, chunk: int = 0, mesh=None, conv_impl: str = 'xla') -> FedAvg:
  return FedAvg(functools.partial(loss_fn, conv_impl=conv_impl), optax.sgd(cfg['local_lr']), optax.sgd(cfg['central_lr']),
                cfg['batch'], cfg['epochs'], weighting='user', chunk=chunk, mesh=mesh)


EVAL_BATCHES = (25, 100, 500)   # evaluation batch sizes the autotune tries (results equal; speed differs)


def choose_execution(cfg: dict, params: dict, clients: int = 8, eval_images: int = 1000) -> dict:
  """How this workload runs fastest here, measured (`ml_ecs.core.autotune.fastest`, cached): the local
  step's convolution and client chunking (one vmapped step, forward and backward, of `clients` clients
  with their own weights: XLA's convolution or the matmul form, one vmap or clients one at a time), and
  the evaluation's convolution and batch size (`make_eval` over `eval_images` test-shaped images, batches
  of EVAL_BATCHES). Returns {'conv_impl', 'chunk', 'eval_conv_impl', 'eval_batch', 'train_autotune',
  'eval_autotune'}."""
  clients = min(clients, cfg['cohort'])
  stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (clients, *p.shape)), params)
  batch = (jnp.ones((clients, cfg['batch'], *cfg['image']), jnp.float32), jnp.zeros((clients, cfg['batch']), jnp.int32),
           jnp.ones((clients, cfg['batch']), bool))
  keys = jax.random.split(jax.random.key(0), clients)
  step = lambda impl, chunk: cohort_map(jax.grad(lambda p, b, k: loss_fn(p, b, k, impl)[0]), 3, chunk=chunk)
  train = {f'{impl}/chunk{chunk}': step(impl, chunk) for impl in CONV_IMPLS for chunk in (0, 1)}
  case = f"pfl_cnn_step|image={tuple(cfg['image'])}|batch={cfg['batch']}|clients={clients}"
  choice, train_record = autotune.fastest(case, train, (stacked, batch, keys), path=autotune.cache_path())
  impl, chunk = choice.split('/chunk')
  n = min(eval_images, cfg['num_test'])
  images, labels = jnp.ones((n, *cfg['image']), jnp.float32), jnp.zeros((n,), jnp.int32)
  evals = {f'{e}/batch{b}': make_eval(b, e) for e in CONV_IMPLS for b in EVAL_BATCHES if b <= n}
  case = f"pfl_cnn_eval|image={tuple(cfg['image'])}|images={n}"
  eval_choice, eval_record = autotune.fastest(case, evals, (params, images, labels), path=autotune.cache_path())
  eval_impl, eval_batch = eval_choice.split('/batch')
  return dict(conv_impl=impl, chunk=int(chunk), eval_conv_impl=eval_impl, eval_batch=int(eval_batch),
              train_autotune=train_record, eval_autotune=eval_record)


def make_round(algo: FedAvg, population: ClientData, cohort: int) -> Callable:
  """Jitted round: sample `cohort` users without replacement (a pure function of the key), run FedAvg."""
  num_users = population.count.shape[0]

  @jax.jit
  def round_fn(state, key):
    k_sample, k_train = jax.random.split(key)
    idx = jax.random.choice(k_sample, num_users, (cohort,), replace=False)
    return algo.apply(state, jax.tree.map(lambda a: a[idx], population), k_train)
  return round_fn


def make_eval(batch: int = 500, conv_impl: str = 'xla', mesh=None) -> Callable:
  """Jitted (accuracy, mean loss) over test images in batches of `batch` (the last one padded, masked). With
  a client `mesh` the test images are split over its devices (each evaluates its share, the sums are added);
  without it, a model replicated over several devices would be evaluated whole on each of them."""
  def sums(params, x, y, valid):
    n = x.shape[0]
    b = min(batch, n)
    steps = math.ceil(n / b)
    pad = steps * b - n
    xs = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(steps, b, *x.shape[1:])
    ys = jnp.pad(y, (0, pad)).reshape(steps, b)
    vs = jnp.pad(valid, (0, pad)).reshape(steps, b)

    def one(inp):
      xb, yb, vb = inp
      logits = cnn_apply(params, xb, conv_impl=conv_impl)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      return ((jnp.argmax(logits, -1) == yb) & vb).sum(), jnp.where(vb, ce, 0.0).sum()
    correct, loss = jax.lax.map(one, (xs, ys, vs))
    return correct.sum(), loss.sum()

  devices = mesh.devices.size if mesh is not None else 1
  if devices > 1:
    def shard_sums(params, x, y, valid):
      return jax.tree.map(lambda s: jax.lax.psum(s, CLIENT_AXIS), sums(params, x, y, valid))
    sums_fn = jax.shard_map(shard_sums, mesh=mesh, in_specs=(P(), P(CLIENT_AXIS), P(CLIENT_AXIS), P(CLIENT_AXIS)),
                            out_specs=P(), check_vma=False)
  else:
    sums_fn = sums

  @jax.jit
  def evaluate(params, x, y):
    n = x.shape[0]
    pad = -n % devices   # every device gets the same number of rows; the padding is masked
    valid = jnp.arange(n + pad) < n
    if pad:
      x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
      y = jnp.pad(y, (0, pad))
    correct, loss = sums_fn(params, x, y, valid)
    return correct / n, loss / n
  return evaluate


def run(rounds: int, cfg: dict | None = None, data: dict | None = None, chunk: int = 0, seed: int = 0,
        log: Callable[[str], None] = print, time_budget_s: float | None = None, sync_rounds: bool = False,
        conv_impl: str = 'auto', eval_batch: int = 500, prng: str = 'rbg', devices: int = 1,
        profile_rounds: int = 0) -> dict:
  """FedAvg on the workload for `rounds` rounds (evaluation every cfg['eval_every']); returns timings
  (compile separately, then seconds per round including evaluation, as pfl's wall clock counts it) and
  the accuracy history. Stops early (and says so) when `time_budget_s` is spent. `sync_rounds` waits for
  every round and records its end time (`round_end_s`, seconds from the start of round 1), for a
  steady-state rate measured the same way as pfl's per-round callback (benchmarks/pfl_cpu.py). `conv_impl`:
  'xla' or 'matmul' (training and evaluation, with `chunk`), or 'auto': `choose_execution` measures the
  convolutions, the chunking and the evaluation batch (its records in the result; `chunk` and `eval_batch`
  are then its choices). `prng`: the
  random-bit generator of sampling and dropout (`jax.random.key(..., impl=)`): 'rbg' (XLA's RngBitGenerator)
  is cheaper on CPU than JAX's default 'threefry2x32', whose dropout masks cost about 15% of a local step.
  `devices` > 1: the cohort's clients are split over that many devices (`shard_map`, `ml_ecs.core.build.client_mesh`);
  on CPU, host devices from `--xla_force_host_platform_device_count` set before JAX starts
  (benchmarks/pfl_cpu.py --cpu_devices), which keep both cores busy where one program's operators leave one idle.
  The draws of 'rbg' keys depend on the partitioning, so the run differs from a one-device run in its random
  masks, not in what it computes. `profile_rounds` > 0: after the timed rounds, that many more rounds run
  under the profiler (`benchmarks.lib.op_profile`) and `op_profile` holds their time per HLO operator."""
  cfg = {**CONFIG, **(cfg or {})}
  if devices < 1 or cfg['cohort'] % devices:
    raise ValueError(f"devices={devices}: expected a positive divisor of the cohort ({cfg['cohort']} clients)")
  mesh = client_mesh(devices) if devices > 1 else None
  data = data or synthetic_cifar10(cfg['num_users'] * cfg['per_user'], cfg['num_test'], cfg['image'], cfg['classes'],
                                   seed)
  population = jax.device_put(partition_iid(data['x_train'], data['y_train'], cfg['num_users'], cfg['per_user'],
                                            seed))
  x_test, y_test = jax.device_put((data['x_test'], data['y_test']))
  params = init_cnn(jax.random.key(seed), cfg['image'], cfg['classes'])
  execution, eval_impl = None, conv_impl
  if conv_impl == 'auto':
    execution = choose_execution(cfg, params)
    conv_impl, chunk, eval_impl = execution['conv_impl'], execution['chunk'], execution['eval_conv_impl']
    eval_batch = execution['eval_batch']
  algo = make_fedavg(cfg, chunk, mesh=mesh, conv_impl=conv_impl)
  state = algo.init(params)
  round_fn, evaluate = make_round(algo, population, cfg['cohort']), make_eval(eval_batch, eval_impl, mesh)
  key = jax.random.key(seed + 1, impl=prng)
  t0 = time.perf_counter()
  compiled = round_fn.lower(state, key).compile()
  evaluate(state.params, x_test, y_test)[0].block_until_ready()
  compile_s = time.perf_counter() - t0
  flops = xla_flops(compiled)
  history, done, round_end = [], 0, []
  t0 = time.perf_counter()
  for r in range(rounds):
    state, metrics = compiled(state, jax.random.fold_in(key, r))
    done = r + 1
    if done % cfg['eval_every'] == 0 or done == rounds:
      acc, loss = evaluate(state.params, x_test, y_test)
      history.append(dict(round=done, accuracy=float(acc), loss=float(loss), train_loss=float(metrics['loss']),
                          t=time.perf_counter() - t0))
      log(f'[ours] round {done}: test accuracy {float(acc):.4f} loss {float(loss):.4f}')
    if sync_rounds:
      jax.block_until_ready(state)
      round_end.append(time.perf_counter() - t0)
    if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
      break
  jax.block_until_ready(state)
  wall = time.perf_counter() - t0
  profile = None
  if profile_rounds:
    profiled = dict(state=state, round=done)

    def one_round():   # rounds after the timed ones, each with its own key
      profiled['round'] += 1
      profiled['state'] = compiled(profiled['state'], jax.random.fold_in(key, profiled['round']))[0]
      return profiled['state']
    lines = op_profile.hlo_lines(compiled)
    ops, totals = op_profile.op_times(one_round, profile_rounds, lines)
    top = sorted(ops, key=lambda k: -ops[k][0])[:40]
    profile = dict(rounds=profile_rounds, **totals, ops={k: list(ops[k]) for k in top},
                   hlo={k: lines.get(k, '') for k in top})
  return dict(op_profile=profile,
              engine='ml-ecs fedavg (cohort_map vmap' + (f', chunk {chunk}' if chunk else '') + f', {conv_impl} conv'
              + (f', clients over {devices} devices' if devices > 1 else '') + ')',
              conv_impl=conv_impl, chunk=chunk, devices=devices,
              round_devices=len(jax.tree.leaves(state.params)[0].sharding.device_set), eval_conv_impl=eval_impl,
              eval_batch=eval_batch, execution=execution, prng=prng,
              rounds=done, wall_s=wall, s_per_round=wall / max(done, 1), s_per_100_rounds=100 * wall / max(done, 1),
              compile_s=compile_s, round_flops_xla=flops, history=history,
              final_accuracy=history[-1]['accuracy'] if history else None, backend=jax.default_backend(),
              device=str(jax.devices()[0]), **(dict(round_end_s=round_end) if sync_rounds else {}))
