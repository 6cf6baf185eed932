"""Worker processes for verifier calls (any picklable `(fn, args)` returning a float) with a per-call
deadline: a call past it scores 0 and its worker is killed and replaced, so one hung answer never blocks a batch.
Used by rl_jax.rewards.score_batch; the workers preload the reward modules, so a restart is a cheap fork."""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _serve(conn: multiprocessing.connection.Connection) -> None:
  """Worker loop: answer each (fn, args) with float(fn(*args)), 0.0 on any failure; None stops it."""
  conn.send("ready")
  while True:
    try:
      call = conn.recv()
    except EOFError:  # the parent is gone
      return
    if call is None:
      return
    try:
      value = float(call[0](*call[1]))
      value = value if np.isfinite(value) else 0.0
    except Exception:
      value = 0.0
    conn.send(value)


@contextlib.contextmanager
def _main_not_reimported():
  """Workers need only the verifiers' modules: hide the caller's script from multiprocessing, so a worker does not re-run
  a script's top-level code (a training script without an `if __name__ == "__main__":` guard would recurse)."""
  main = sys.modules["__main__"]
  saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
  main.__dict__.pop("__file__", None)
  main.__spec__ = None
  try:
    yield
  finally:
    main.__dict__.pop("__spec__", None)
    main.__dict__.update(saved)


class VerifierPool:
  """Worker processes running verifier calls with a per-call timeout; a call past it scores 0 and its worker is
  killed and replaced, so one hung answer never blocks the rest of the batch. Not thread-safe."""

  def __init__(self, workers: int = min(4, os.cpu_count() or 1)):
    if workers < 1:
      raise ValueError(f"VerifierPool needs at least one worker, got {workers}")
    # forkserver, not fork: the parent runs jax threads. Preloading this module makes each (re)start a cheap fork.
    self._ctx = multiprocessing.get_context("forkserver")
    self._ctx.set_forkserver_preload(["rl_jax.rewards", "math_verify", "reasoning_gym"])  # missing: skipped
    self._workers = [self._start() for _ in range(workers)]
    self.timeouts = 0  # calls killed so far

  def _start(self) -> tuple[Any, multiprocessing.connection.Connection]:
    conn, child = self._ctx.Pipe()
    proc = self._ctx.Process(target=_serve, args=(child,), daemon=True)
    with _main_not_reimported():
      proc.start()
    child.close()
    if not conn.poll(300) or conn.recv() != "ready":  # imports may be slow; only the first start pays them
      raise RuntimeError("a verifier worker did not start")
    return proc, conn

  def _replace(self, w: int) -> None:
    proc, conn = self._workers[w]
    proc.kill()
    proc.join()
    conn.close()
    self._workers[w] = self._start()

  def run(self, calls: Sequence[tuple[Callable[..., float], tuple]], timeout_s: float) -> list[float]:
    """float(fn(*args)) for each (fn, args); 0.0 for a call that raised, crashed or ran past timeout_s."""
    results, todo = [0.0] * len(calls), list(reversed(range(len(calls))))
    busy: dict[int, tuple[int, float]] = {}  # worker -> (call, deadline)
    while todo or busy:
      for w in range(len(self._workers)):
        while w not in busy and todo:  # an unpicklable call is skipped (0.0) and the worker takes the next
          j = todo.pop()
          try:
            self._workers[w][1].send(calls[j])
            busy[w] = (j, time.monotonic() + timeout_s)
          except (BrokenPipeError, ConnectionError):
            self._replace(w)
          except Exception:
            pass
      conns = {self._workers[w][1]: w for w in busy}
      wait_s = max(0.0, min(d for _, d in busy.values()) - time.monotonic()) if busy else 0.0
      for conn in multiprocessing.connection.wait(list(conns), timeout=wait_s):
        j, _ = busy.pop(conns[conn])
        try:
          results[j] = conn.recv()
        except (EOFError, OSError):  # the worker died (e.g. killed for memory)
          self._replace(conns[conn])
      for w, (_, deadline) in list(busy.items()):
        if deadline <= time.monotonic():
          del busy[w]
          self.timeouts += 1
          self._replace(w)
    return results

  def close(self) -> None:
    for proc, conn in self._workers:
      try:
        conn.send(None)
      except OSError:
        pass
      proc.join(1.0)
      proc.kill()
      conn.close()
    self._workers = []

  def __enter__(self) -> VerifierPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


_DEFAULT_POOL: VerifierPool | None = None


def default_pool() -> VerifierPool:
  """A process-wide pool, started on first use and closed at exit."""
  global _DEFAULT_POOL
  if _DEFAULT_POOL is None:
    _DEFAULT_POOL = VerifierPool()
    atexit.register(_DEFAULT_POOL.close)
  return _DEFAULT_POOL
