"""N local CPU processes of one run, each with K forced host devices (a many-host job on one machine).

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \\
      --config=configs/tiny.py --workdir=/tmp/mp

Every process runs launch/train.py (or --script) with the arguments after `--`, plus
--coordinator_address=127.0.0.1:PORT (a free port), --num_processes and --process_id; its
environment gets JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=K.
Process 0 prints the run's log. SIGTERM / Ctrl-C are passed to every process (they stop
together after the current round, with a checkpoint); if one process fails the others are
stopped at once (SIGTERM, SIGKILL 10 s later if one is stuck in a collective). Exit status: that
of the first process that failed (killed by signal N: 128 + N), else 0.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NUM = flags.DEFINE_integer('num_processes', 2, 'Processes to start.')
_DEVICES = flags.DEFINE_integer('devices_per_process', 1, 'Forced host (CPU) devices per process.')
_PORT = flags.DEFINE_integer('port', 0, 'Coordinator port (0: a free one).')
_SCRIPT = flags.DEFINE_string('script', os.path.join(ROOT, 'launch', 'train.py'), 'The program every process runs.')


def free_port() -> int:
  """A TCP port nobody listens on now (asked of the OS)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_commands(num_processes: int, devices_per_process: int, port: int, script: str, args: Sequence[str],
                     env: Mapping[str, str]) -> list[tuple[list[str], dict[str, str]]]:
  """(argv, environment) of every process."""
  if num_processes < 1:
    raise ValueError(f'--num_processes = {num_processes}: must be >= 1')
  if devices_per_process < 1:
    raise ValueError(f'--devices_per_process = {devices_per_process}: must be >= 1')
  xla = ' '.join(f for f in env.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform'))
  penv = dict(env, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'{xla} --xla_force_host_platform_device_count={devices_per_process}'.strip())
  return [([sys.executable, script, *args, f'--coordinator_address=127.0.0.1:{port}',
            f'--num_processes={num_processes}', f'--process_id={i}'], penv) for i in range(num_processes)]


def exit_status(returncode: int) -> int:
  """A child's return code as a shell exit status (killed by signal N: 128 + N)."""
  return 128 - returncode if returncode < 0 else returncode


def run(commands: Sequence[tuple[list[str], dict[str, str]]], cwd: str = ROOT) -> int:
  """Runs the processes to the end; forwards SIGTERM / SIGINT; stops the rest when one fails."""
  procs = [subprocess.Popen(argv, env=env, cwd=cwd) for argv, env in commands]

  forwarded = []

  def forward(signum, frame):
    forwarded.append(signum)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    status, failed_at = 0, None
    # Every process is polled every time (`any(...)` would stop at the first live one and never see
    # a later one die: the survivors then hang in a collective until Gloo aborts them).
    while [p for p in procs if p.poll() is None]:
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed and failed_at is None and not forwarded:   # the others would wait for it in a collective: SIGTERM, then SIGKILL
        print(f'local_multiprocess: a process exited with status {exit_status(failed[0])}; stopping the others',
              file=sys.stderr, flush=True)
        status, failed_at = exit_status(failed[0]), time.time()
        for p in procs:
          if p.poll() is None:
            p.terminate()
      if failed_at is not None and time.time() - failed_at > 10:
        for p in procs:
          if p.poll() is None:
            p.kill()
      time.sleep(0.2)
    return status or next((exit_status(p.returncode) for p in procs if p.returncode), 0)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def main(argv: Sequence[str]) -> int:
  commands = process_commands(_NUM.value, _DEVICES.value, _PORT.value or free_port(), _SCRIPT.value, argv[1:],
                              os.environ)
  return run(commands)


if __name__ == '__main__':
  app.run(main)
