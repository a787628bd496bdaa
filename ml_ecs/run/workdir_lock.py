"""One process per workdir: an advisory lock on WORKDIR/.lock that names its holder.

The lock is an exclusive `flock` on the file, held for the life of the process (the kernel
releases it when the process exits or is killed, also by SIGKILL), and the file records the
holder: `{"pid": ..., "host": ..., "started": ...}`. A second process on the same workdir is
refused at once with `WorkdirLocked`, naming the holder's pid and host. The file of a process
that died stays behind but holds no lock: the next process takes it over (and says whose it
was). The file is never deleted, so two processes can never lock two different files.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Callable

LOCK_NAME = '.lock'


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # alive, another user's
    return True
  return True


def _read_holder(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 4096).decode() or '{}')
  except (OSError, ValueError):
    return {}


def _holder_text(holder: dict) -> str:
  if not holder:
    return 'an unknown process'
  return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started', '?')})"


class WorkdirLock:
  """`with WorkdirLock(workdir, log): ...` holds WORKDIR/.lock; `acquire()`/`release()` by hand."""

  def __init__(self, workdir: str, log: Callable[[str], None] | None = None):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.log = log or (lambda s: None)
    self.fd: int | None = None

  def acquire(self) -> 'WorkdirLock':
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirLocked(
          f'{os.path.dirname(self.path)} is in use by {_holder_text(holder)}: one process per workdir '
          '(wait for it, stop it, or use another --workdir)') from None
    except OSError as e:   # a filesystem without flock: say so rather than run unprotected silently
      os.close(fd)
      raise WorkdirLocked(f'cannot lock {self.path} ({e}); this filesystem does not support flock') from None
    previous = _read_holder(fd)
    host = socket.gethostname()
    if previous.get('pid') and previous.get('pid') != os.getpid():
      same_host = previous.get('host') == host
      gone = 'is gone' if same_host and not _pid_alive(int(previous['pid'])) else 'no longer holds it'
      self.log(f'taking over the stale lock {self.path} of {_holder_text(previous)}: that process {gone}')
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': host,
                             'started': time.strftime('%Y-%m-%dT%H:%M:%S')}).encode())
    os.fsync(fd)
    self.fd = fd
    return self

  def release(self) -> None:
    if self.fd is not None:
      try:
        os.ftruncate(self.fd, 0)   # no holder named any more (the file itself stays)
      except OSError:
        pass
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
