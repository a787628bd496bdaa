"""Client-steps per second of the ML-ECS local update, run several ways (benchmarks/lib/throughput.py).

  python benchmarks/throughput.py --out=benchmarks/RESULTS.md       # full grid, ~15-20 min on 2 cores
  python benchmarks/throughput.py --clients=16,64 --workloads=small  # smoke; Markdown to a temp file

Without --out the Markdown report goes to a new temporary file (its path is printed), so a run
never overwrites the committed benchmarks/RESULTS.md unless asked to. The sharded variants run
in a subprocess of this script (`--worker=sharded`) with forced CPU devices.
"""
import os
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root

from absl import app, flags

from benchmarks.lib import throughput as bm


class _PositiveIntListParser(flags.ListParser):
  """Comma-separated integers >= 1."""

  def parse(self, argument):
    items = super().parse(argument)
    try:
      values = [int(x) for x in items]
    except ValueError:
      raise ValueError(f'expected comma-separated integers, got {argument!r}') from None
    if not values or min(values) < 1:
      raise ValueError(f'expected one or more integers >= 1, got {argument!r}')
    return values

  def flag_type(self):
    return 'comma separated list of positive integers'


def _define_int_list(name: str, default, help_: str):
  flags.DEFINE(_PositiveIntListParser(), name, ','.join(map(str, default)), help_,
               serializer=flags.CsvListSerializer(','))
  return flags.FLAGS[name]


_CLIENTS = _define_int_list('clients', bm.DEFAULT_CLIENTS, 'Client counts (cohort sizes).')
_WORKLOADS = flags.DEFINE_list('workloads', list(bm.DEFAULT_WORKLOADS), 'Workloads: ' + ', '.join(
    f"{k} (batch {v['batch']}, seq {v['seq']})" for k, v in bm.WORKLOADS.items()) + '.')
_STEPS = flags.DEFINE_integer('steps', 1, 'Local optimizer steps per client per call (per round for flower).',
                              lower_bound=1)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls per variant and cell (median reported), after one '
                                'warm-up.', lower_bound=1)
_WIDTH = flags.DEFINE_integer('width', 64, 'Backbone width (default: edge model of configs/default.py).',
                              lower_bound=1)
_LAYERS = flags.DEFINE_integer('layers', 2, 'Backbone layers (default: edge model of configs/default.py).',
                               lower_bound=1)
_HEADS = flags.DEFINE_integer('heads', 4, 'Backbone attention heads.', lower_bound=1)
_VARIANTS = flags.DEFINE_list('variants', list(bm.ALL_VARIANTS), f'Variants to run, of {bm.ALL_VARIANTS}.')
_CHUNKS = _define_int_list('chunks', bm.DEFAULT_CHUNKS, 'Chunk sizes k of vmap_chunk{k} (k < clients only).')
_OUT = flags.DEFINE_string('out', None, 'Markdown results file. Default: a new temporary file (the committed '
                           'benchmarks/RESULTS.md is written only when named here).')
_JSON = flags.DEFINE_string('json', '', 'Optional raw results (JSON).')
_CELL_BUDGET = flags.DEFINE_float('cell_budget_s', 30.0,
                                  'Wall-clock budget of one variant in one cell (warm-up + timed calls, compile '
                                  'excluded). A variant whose projected warm-up + one timed call exceeds it is '
                                  'skipped; otherwise repeats are cut to fit.')
_MAX_MEM_GB = flags.DEFINE_float('max_mem_gb', 6.0, 'Skip a variant whose compiled peak memory (XLA buffer '
                                 'assignment) plus held state exceeds this.')
_SAMPLES = flags.DEFINE_integer('samples_per_client', 64, 'Private training samples held per client.',
                                lower_bound=1)
_DEVICES = flags.DEFINE_integer('sharded_devices', 4, 'Forced CPU devices of the sharded variant.', lower_bound=1)
_FLOWER_WORKERS = flags.DEFINE_integer('flower_workers', 0, 'Flower fit thread pool size (0 = Flower default).',
                                       lower_bound=0)
_ROUND_DEVICES = _define_int_list('round_devices', bm.DEFAULT_ROUND_DEVICES,
                                  'Device counts of the round variants (ours, ours_vmap, drjax) that --variants=drjax '
                                  'runs; counts > 1 run in a subprocess with that many forced CPU devices.')
_ROUND_CHUNK = flags.DEFINE_integer('round_chunk', bm.DEFAULT_ROUND_CHUNK, 'Chunk k of the "ours" round variant '
                                    '(lax.map over k vmapped clients per device; 0 = one vmap).', lower_bound=0)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of data, initial state and keys.')
_TOTAL_BUDGET = flags.DEFINE_float('total_budget_s', 1200.0, 'Wall-clock budget of the whole run; variants whose '
                                   'projected time would overrun it are skipped (with the reason).')
_DEADLINE = flags.DEFINE_float('deadline_unix', 0.0, 'Internal: absolute deadline (time.time()) of a worker.')
_COMBINE = flags.DEFINE_list('combine', [], 'Write one report from the --json files of earlier runs (pieces of a '
                              'grid run one after another): rows of a later file replace the same (workload, clients, '
                              'variant) of an earlier one; no benchmark runs.')
_WORKER = flags.DEFINE_enum('worker', '', ['', 'sharded'], 'Internal: "sharded" runs the forced-device variants '
                            '(--variants: sharded and/or drjax at --round_devices), writes --worker_out.')
_WORKER_OUT = flags.DEFINE_string('worker_out', '', 'Internal: JSON file of the worker results.')


def _cell_args() -> dict:
  """Keyword arguments of bm.run_cells from the flags."""
  return dict(steps=_STEPS.value, repeats=_REPEATS.value, width=_WIDTH.value, layers=_LAYERS.value,
              heads=_HEADS.value, chunks=_CHUNKS.value, budget_s=_CELL_BUDGET.value,
              max_mem=_MAX_MEM_GB.value * 2**30, samples=_SAMPLES.value, seed=_SEED.value,
              devices=_DEVICES.value, flower_workers=_FLOWER_WORKERS.value, round_chunk=_ROUND_CHUNK.value)


def _worker_argv(clients: list[int], workload: str, deadline: float, variants: list[str], devices: int) -> list[str]:
  """This script's command line for the forced-device worker of one workload and device count."""
  passed = ('steps', 'repeats', 'width', 'layers', 'heads', 'cell_budget_s', 'max_mem_gb', 'samples_per_client',
            'seed', 'sharded_devices', 'round_chunk')
  return [os.path.abspath(__file__), '--worker=sharded', f'--clients={",".join(map(str, clients))}',
          f'--workloads={workload}', f'--deadline_unix={deadline}', f'--variants={",".join(variants)}',
          f'--round_devices={devices}', *(f'--{name}={flags.FLAGS[name].value}' for name in passed)]


def _worker_runs(variants: list[str]) -> dict[int, list[str]]:
  """{forced device count: variants its worker runs}: sharded at --sharded_devices, drjax at every
  --round_devices count > 1 (count 1 runs in this process)."""
  runs: dict[int, list[str]] = {}
  if 'sharded' in variants:
    runs.setdefault(_DEVICES.value, []).append('sharded')
  if 'drjax' in variants:
    for d in _ROUND_DEVICES.value:
      if d > 1:
        runs.setdefault(d, []).append('drjax')
  return runs


def main(argv):
  del argv
  t_start = time.perf_counter()
  clients, workloads, variants = list(_CLIENTS.value), list(_WORKLOADS.value), list(_VARIANTS.value)
  for w in workloads:
    if w not in bm.WORKLOADS:
      raise app.UsageError(f'unknown workload {w!r}; expected {list(bm.WORKLOADS)}')
  for v in variants:
    if v not in bm.ALL_VARIANTS:
      raise app.UsageError(f'unknown variant {v!r}; expected {bm.ALL_VARIANTS}')
  cell = _cell_args()

  if _COMBINE.value:
    _write_combined(_COMBINE.value)
    return

  if _WORKER.value == 'sharded':
    import jax
    bm.log(f'[sharded] devices: {jax.devices()}')
    rows, _ = bm.run_cells(clients, workloads, variants, on_row=lambda r: bm.log('[sharded] ' + bm.fmt_row(r)),
                           deadline=_DEADLINE.value or None, round_devices=_ROUND_DEVICES.value, **cell)
    bm.write_json(_WORKER_OUT.value, rows)
    return

  info = bm.machine_info()
  bm.log('machine: ' + ', '.join(f'{k}={v}' for k, v in info.items()))
  deadline = time.time() + _TOTAL_BUDGET.value
  local = [v for v in variants if v != 'sharded' and (v != 'drjax' or 1 in _ROUND_DEVICES.value)]
  rows, mem_info = [], {}
  for wl in workloads:   # per workload: this process's variants, then one subprocess per forced device count
    r, m = bm.run_cells(clients, [wl], local, on_row=lambda r: bm.log(bm.fmt_row(r)), deadline=deadline,
                        round_devices=(1,), **cell)
    rows += r
    mem_info.update(m)
    for d, names in _worker_runs(variants).items():
      rows += bm.run_sharded_subprocess(_worker_argv(clients, wl, deadline, names, d), clients, [wl], d, names)
  info.update(bm.loadavg('loadavg_at_end'))
  rows = bm.sort_rows(rows, workloads)
  elapsed = time.perf_counter() - t_start
  bm.print_summary(rows, mem_info)

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = 'python ' + ' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], root)] + sys.argv[1:])
  settings = bm.report_settings(clients, workloads, variants, cell, mem_info, _MAX_MEM_GB.value,
                                _TOTAL_BUDGET.value)
  out = _OUT.value
  if not out:
    fd, out = tempfile.mkstemp(prefix='ml_ecs_bench_', suffix='.md')
    os.close(fd)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    f.write(bm.markdown(rows, mem_info, info, command, settings, elapsed))
  bm.log(f'\nwrote {out}')
  if _JSON.value:
    bm.write_json(_JSON.value, dict(rows=rows, memory=mem_info, machine=info, command=command))


def _write_combined(paths: list[str]) -> None:
  """One Markdown report from several --json pieces (each piece's command and load averages kept)."""
  import json
  rows: dict[tuple, dict] = {}
  mem_info, commands, info = {}, [], {}
  for i, path in enumerate(paths):
    with open(path) as f:
      piece = json.load(f)
    for r in piece['rows']:
      rows[(r['workload'], r['clients'], r['variant'])] = r
    mem_info.update(piece.get('memory', {}))
    commands.append(piece['command'])
    m = piece.get('machine', {})
    info = info or {k: v for k, v in m.items() if not k.startswith('loadavg')}
    info[f'piece {i + 1} loadavg start / end'] = f"{m.get('loadavg_at_start')} / {m.get('loadavg_at_end')}"
  workloads = list(dict.fromkeys(w for w, _, _ in rows))
  clients = sorted({c for _, c, _ in rows})
  ordered = bm.sort_rows(list(rows.values()), workloads)
  settings = dict(pieces=len(paths), clients=clients, workloads=workloads)
  text = bm.markdown(ordered, mem_info, info, '\n'.join(commands), settings, 0.0)
  out = _OUT.value or tempfile.mkstemp(prefix='ml_ecs_bench_', suffix='.md')[1]
  with open(out, 'w') as f:
    f.write(text)
  bm.log(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
