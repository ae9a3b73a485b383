"""Stall watchdog of multi-process training: ends a process whose training step stops finishing, naming the process
and the step.

A collective that never completes (a peer process hung, a CPU collective crawling or deadlocked) otherwise blocks
every process forever, with idle CPUs and no message. The training loop reports each step it dispatches
(`StepWatchdog.dispatched(step, outputs)`); a daemon thread polls, without blocking, whether the oldest unfinished
step's outputs are ready, and once that step has been running for the timeout (counted from when the step before
it finished) it logs the process, the step and the timeout, dumps every Python thread's stack and exits the process
with STALL_EXIT_CODE, so that the launcher (scripts/launch_local.py, `srun --kill-on-bad-exit`) stops the job.

The timeout is the environment variable ATR_JAX_STALL_TIMEOUT_S (seconds; default DEFAULT_TIMEOUT_S; 0 switches the
watchdog off). It watches multi-process jobs only: one process has no peer to wait for.
"""

import collections
import faulthandler
import os
import sys
import threading
import time

import jax
from absl import logging

ENV_VAR = "ATR_JAX_STALL_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
STALL_EXIT_CODE = 75


def timeout_from_env(environ=os.environ) -> float:
  """The stall timeout in seconds from ATR_JAX_STALL_TIMEOUT_S (0: off)."""
  value = environ.get(ENV_VAR, "").strip()
  if not value:
    return DEFAULT_TIMEOUT_S
  try:
    timeout_s = float(value)
  except ValueError:
    raise ValueError(f"{ENV_VAR}={value!r} is not a number of seconds (0 switches the stall watchdog off)") from None
  if timeout_s < 0:
    raise ValueError(f"{ENV_VAR}={value!r} must be >= 0 (0 switches the stall watchdog off)")
  return timeout_s


class StepWatchdog:
  """Follows dispatched training steps; see the module docstring. Inactive (every call a no-op) when `timeout_s`
  is 0."""

  def __init__(self, timeout_s: float, poll_s: float = 1.0, on_stall=None):
    self.timeout_s = timeout_s
    self._poll_s = min(poll_s, timeout_s / 4) if timeout_s else poll_s
    self._on_stall = on_stall or _exit_on_stall
    self._pending = collections.deque()  # (step, outputs), oldest first.
    self._lock = threading.Lock()
    self._last_finished = (None, time.monotonic())  # (step, when it was seen finished)
    if timeout_s:
      threading.Thread(target=self._watch, name="atr_jax_stall_watchdog", daemon=True).start()

  @classmethod
  def for_this_job(cls) -> "StepWatchdog":
    """Active in a multi-process job with the timeout of ATR_JAX_STALL_TIMEOUT_S; inactive otherwise."""
    return cls(timeout_from_env() if jax.process_count() > 1 else 0.0)

  def dispatched(self, step: int, outputs) -> None:
    """Records that training step `step` was dispatched; it is finished once every array of `outputs` is ready."""
    if not self.timeout_s:
      return
    with self._lock:
      if not self._pending:  # The clock of a step starts when the loop hands it over or its predecessor finished.
        self._last_finished = (self._last_finished[0], time.monotonic())
      self._pending.append((step, jax.tree.leaves(outputs)))

  def _watch(self) -> None:
    while True:
      time.sleep(self._poll_s)
      with self._lock:
        while self._pending and all(x.is_ready() for x in self._pending[0][1]):
          self._last_finished = (self._pending.popleft()[0], time.monotonic())
        if not self._pending:
          continue
        stalled_step = self._pending[0][0]
        last_step, since = self._last_finished
      waited = time.monotonic() - since
      if waited >= self.timeout_s:
        self._on_stall(stalled_step, last_step, waited, self.timeout_s)
        return


def stall_message(stalled_step: int, last_step: int | None, waited_s: float, timeout_s: float) -> str:
  last = f"step {last_step} was the last to finish" if last_step is not None else "no step finished yet"
  return (
    f"process {jax.process_index()} of {jax.process_count()}: training step {stalled_step} has not finished "
    f"after {waited_s:.0f} s ({last}): a collective is stalled or another process is stuck; stopping this "
    f"process ({ENV_VAR}={timeout_s:g}; 0 switches the watchdog off)"
  )


def _exit_on_stall(stalled_step: int, last_step: int | None, waited_s: float, timeout_s: float) -> None:
  logging.error("%s", stall_message(stalled_step, last_step, waited_s, timeout_s))
  logging.flush()
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(STALL_EXIT_CODE)
