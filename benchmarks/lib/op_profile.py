"""Where a compiled program's time goes, operator by operator: `jax.profiler` traces some calls, and the
XLA executor threads' events are summed per HLO instruction (thread seconds: two operators running at
once on two cores both count), each named with its line of the optimised HLO.

Control-flow containers (while, conditional, call) are left out: their time is their body's operators;
the executor's own events (scheduling, waiting) are summed apart.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from typing import Any, Callable

CONTAINERS = re.compile(r'^(while|conditional|call)(\.\d+)?$')


def op_times(call: Callable[[], Any], calls: int, instructions
             ) -> tuple[dict[str, tuple[float, int]], dict[str, float]]:
  """Runs `call()` `calls` times under the profiler (blocking on each result) and returns ({HLO instruction:
  (thread seconds per call, events per call)} for the names in `instructions` (`hlo_lines` of the program),
  {'executor': their thread seconds per call, 'other': per call of the XLA threads' other events
  (scheduling, waiting, thread-pool regions), 'wall': seconds per call under the profiler, the calls alone})."""
  import jax   # here, not at import: benchmarks/pfl_cpu.py sets XLA_FLAGS before JAX is first imported
  with tempfile.TemporaryDirectory(prefix='op_profile_') as tmp:
    jax.profiler.start_trace(tmp)
    try:
      t0 = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(call())
      wall = time.perf_counter() - t0
    finally:
      jax.profiler.stop_trace()
    files = sorted(glob.glob(os.path.join(tmp, '**', '*.xplane.pb'), recursive=True))
    if not files:
      raise RuntimeError(f'op_times: the profiler wrote no trace under {tmp}')
    data = jax.profiler.ProfileData.from_file(files[-1])
  total, count, other = collections.Counter(), collections.Counter(), 0
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):
        continue
      for ev in line.events:
        if CONTAINERS.match(ev.name):
          continue
        if ev.name in instructions:
          total[ev.name] += ev.duration_ns
          count[ev.name] += 1
        else:
          other += ev.duration_ns
  ops = {k: (v / calls / 1e9, count[k] / calls) for k, v in total.items()}
  return ops, {'executor': sum(total.values()) / calls / 1e9, 'other': other / calls / 1e9, 'wall': wall / calls}


def hlo_lines(compiled) -> dict[str, str]:
  """{instruction name: its optimised-HLO line without the name, metadata and backend config}."""
  out = {}
  for line in (compiled.as_text() or '').splitlines():
    m = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$', line)
    if m:
      out[m.group(1)] = re.sub(r',\s*(metadata|backend_config|frontend_attributes)=.*$', '', m.group(2))[:160]
  return out


def table(ops: dict[str, tuple[float, int]], lines: dict[str, str], top: int = 25, unit: str = 'call') -> list[str]:
  """Markdown rows of the `top` operators by time: thread ms per call, events per call, ms per event, HLO."""
  rows = [f'| HLO instruction | thread ms per {unit} | events per {unit} | ms per event | optimised HLO |',
          '|---|---:|---:|---:|---|']
  for name, (sec, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
    hlo = lines.get(name, '').replace('|', '\\|')
    rows.append(f'| `{name}` | {1e3 * sec:.1f} | {n:g} | {1e3 * sec / max(n, 1e-9):.3f} | `{hlo}` |')
  return rows
