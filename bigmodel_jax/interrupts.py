"""Ctrl-C and SIGTERM from the first instant of a launch until the training loop takes them over.

Before the loop there is nothing to save (a fresh run has no progress, a resumed one has its checkpoint, and every
record is written atomically: a kill -9 at any moment resumes exactly), so a signal ends the process at once with
128 + its number and one line. Python would otherwise raise KeyboardInterrupt wherever the main thread happens to
be: inside an extension module's import (a C++ abort), or inside a library's `except BaseException` (the interrupt
swallowed, the run trained to completion with exit 0). And Python runs its handlers only between bytecodes, which
can be seconds away during an XLA compilation; the byte the interpreter's C handler writes to the wakeup fd is
read by a thread at once, so the exit is prompt whatever the main thread is doing.

The training loop installs its own handler (checkpoint first, then exit: train.py), as do the server and the sweep
drivers; while it is installed this module leaves the signal to it, and restore() gives the signals back. Code with
something to finish (--mode=sample's streamed text) opens `holding()`: a first signal is then held for the main
thread, which asks `held()` at its next safe point and ends cleanly; a second one ends the process at once as
before. Standard library only: it is installed before anything slow is imported.
"""

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Where a training launch is when this module has the signals: train.py sets the phase after its loop.
PHASE = "before training started; nothing needed saving (launch the same command again to start or resume)"


def _handler(signum, _frame):  # runs only if the watcher thread has not ended the process first
  if _holding is None:  # while holding, the watcher alone counts the signals (each one reaches both)
    _exit(signum)


_holding: list[int] | None = None  # while holding(): the signals held for the main thread (the first only)
_holding_lock = threading.Lock()


@contextlib.contextmanager
def holding():
  """While open (from the main thread, after install()), a first Ctrl-C / SIGTERM is not the end of the process:
  held() names it, and the main thread ends cleanly at its next check, with its own one line; a second signal ends
  the process at once; one the block ended without raising for ends it as it leaves. Without install(): nothing held
  (Python's KeyboardInterrupt)."""
  global _holding
  if not _installed or threading.current_thread() is not threading.main_thread():
    yield
    return
  _holding = held_now = []
  try:
    yield
  finally:
    with _holding_lock:  # a signal the watcher is holding right now lands in held_now before it is looked at
      _holding = None
  if held_now:  # arrived after the block's last check
    _exit(held_now[0])


def held() -> int | None:
  """The signal held by holding() (None: none arrived)."""
  return _holding[0] if _holding else None


_exiting = threading.Lock()  # the watcher thread and the Python-level handler may both see one signal
# where the line goes: a copy of stderr made at install, as fd 2 itself may be captured just then (a checkpoint
# restore points it at a file while orbax reads, checkpoint._redirect_stderr), which would swallow the line
_stderr = 2


def _exit(signum: int) -> None:
  if not _exiting.acquire(blocking=False):
    threading.Event().wait()  # the other caller is ending the process
  mode = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--mode=")), "train")
  name = signal.Signals(signum).name
  what = f"stopped {PHASE}" if mode == "train" else f"--mode={mode} stopped; its outputs may be incomplete"
  try:
    os.write(_stderr, f"error: {name}: {what}\n".encode())
  finally:
    os._exit(128 + signum)


_CAUGHT_UP = 0  # not a signal: the byte restore() writes to learn when the watcher has read every earlier one
_caught_up = threading.Condition()
_markers = [0, 0]  # written by restore(), read by the watcher: a restore that timed out leaves its byte behind
_write_fd: int | None = None


def restore(previous: dict) -> None:
  """Puts back the handlers {signal: handler} that code which took the signals over (the training loop, a server)
  replaced. The watcher thread reads a signal's byte when it next gets the interpreter, which may be after the
  taker's own handler ran and the handlers were put back: it then saw this module's handler, took the signal for
  one that arrived after, and ended the process (a served SIGTERM, drained in 1 ms, exited 143 instead of 0). So
  the watcher first reads every byte written so far, while the taker's handlers are still in place."""
  if _write_fd is not None and threading.current_thread() is threading.main_thread():
    try:
      os.write(_write_fd, bytes([_CAUGHT_UP]))
    except OSError:  # the pipe is full of signals' bytes: the watcher is reading them now
      pass
    else:
      _markers[0] += 1
      with _caught_up:  # a signal meanwhile still goes to the taker's handler (this wait is interruptible)
        _caught_up.wait_for(lambda: _markers[1] >= _markers[0], timeout=5)
  for signum, handler in previous.items():
    signal.signal(signum, handler)


def _watch(read_fd: int) -> None:
  while True:
    try:
      data = os.read(read_fd, 16)
    except OSError:
      return
    for signum in data:
      if signum == _CAUGHT_UP:
        with _caught_up:
          _markers[1] += 1
          _caught_up.notify_all()
        continue
      if signum in SIGNALS and signal.getsignal(signum) is _handler:  # not handed to the training loop
        with _holding_lock:
          holding = _holding
          held_it = holding is not None and not holding
          if held_it:
            holding.append(signum)
        if not held_it:
          _exit(signum)


_installed = False


def install() -> None:
  """From the main thread, first thing (bigmodel_jax/__init__.py for python -m bigmodel_jax.main, run() for the
  console script): every later handler (the training loop's) replaces this one."""
  global _installed, _stderr, _write_fd
  if _installed or threading.current_thread() is not threading.main_thread():
    return
  _installed = True
  try:
    _stderr = os.dup(2)
  except OSError:  # no stderr at all
    pass
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  for signum in SIGNALS:
    signal.signal(signum, _handler)
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  _write_fd = write_fd
  threading.Thread(target=_watch, args=(read_fd,), name="early-signals", daemon=True).start()

