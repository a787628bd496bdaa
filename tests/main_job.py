"""The main job (launch/train.py) as the integration tests spawn it."""
import os
import subprocess
import sys
import time

from tests.paths import ROOT

# configs/tiny.py with simulated faults (their draws are functions of the round key, so resumed and repeated
# runs must match too) and a checkpoint every round: the run the resume and kill tests interrupt.
FAULTY_FLAGS = ('--noprogress', '--config.train.rounds=3', '--config.train.eval_every=1',
                '--config.train.checkpoint_every=1', '--config.train.dropout_rate=0.2',
                '--config.train.straggler_rate=0.3')


def command(workdir, *flags, config: str = 'tiny.py') -> list[str]:
  """argv of the main job on configs/`config` in `workdir` with `flags`."""
  return [sys.executable, os.path.join(ROOT, 'launch', 'train.py'), '--config=' + os.path.join(ROOT, 'configs', config),
          f'--workdir={workdir}', *flags]


def faulty_command(workdir, *extra) -> list[str]:
  """argv of the main job on configs/tiny.py with FAULTY_FLAGS (and `extra`) in `workdir`."""
  return command(workdir, *FAULTY_FLAGS, *extra)


def start_and_signal(workdir, sig, after_checkpoint: int, env: dict) -> tuple[int, str]:
  """Starts `faulty_command` in `workdir`, sends `sig` once checkpoint `after_checkpoint` is finalised and
  waits: (return code, output)."""
  proc = subprocess.Popen(faulty_command(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=ROOT)
  target = os.path.join(workdir, 'checkpoints', str(after_checkpoint))
  deadline = time.time() + 600
  while not os.path.isdir(target) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None, 'the run ended before it could be signalled: ' + proc.stdout.read()[-2000:]
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out
