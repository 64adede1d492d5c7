"""Forked worker processes on Linux: step 1's clusters on the embedded engine (`ForkMap`),
and the value check beside Ray's start (`ForkCall`).

Threads share one GIL. Every numpy call on a cluster releases it and takes it back, and
with two threads each take-back may wait for the other thread's Python (and for an idle
core to wake): step 1 in two threads ran at ~85% of two separate processes on 2 cores, and
the gap grows with the thread count. Forked processes share nothing but the input pages
(read-only memory maps) and start in ~10 ms each: no imports, the tasks' arguments are
inherited, not pickled (`_TASKS`). Only the results (cluster sizes) come back.

Fork is only used where it is safe: Linux, CPU work (a CUDA context does not survive a
fork), and for step 1, whose kernel uses no OpenMP; the value check with its fused
assignment forks only when each faiss search runs on one OpenMP thread (GNU OpenMP hangs in
a child forked after it started its threads, when the child asks for a team of several;
one thread needs no team: tested in tests/select/test_forked.py).

`ForkCall` runs the value check while the driver starts Ray (engine._ray_during_check). In
a thread of the driver it shared the GIL with `import ray` and `ray.init`, both Python-heavy:
on 2 cores the 250k-row check took 0.9-1.1 s there against 0.4 s alone, and slowed Ray's
start; in a forked child the check takes ~0.5 s and Ray's first tasks start ~0.2 s earlier.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from tqdm.auto import tqdm

from bunny.errors import BunnyError

_TASKS: tuple | None = None  # (fn, arg_list), set before the pool forks: children inherit it
_CALL: tuple | None = None  # ForkCall's (fn, args, nice), set while its child is forked


def available() -> bool:
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _pool(workers: int) -> ProcessPoolExecutor:
    """A pool whose children are forked (within the first `submit`, inheriting `_TASKS` /
    `_CALL` as they are then)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


def _run(i: int):
    fn, arg_list = _TASKS
    return fn(*arg_list[i])


class ForkMap:
    """`LocalMap`'s interface with a process per worker, forked for each call."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)

    def __call__(self, fn, arg_list, desc, show, weights=None):
        global _TASKS
        bar = tqdm(total=sum(weights) if weights else len(arg_list), desc=desc, disable=not show)
        out = []
        _TASKS = (fn, arg_list)
        pool = _pool(min(self.workers, max(1, len(arg_list))))
        try:
            futures = [pool.submit(_run, i) for i in range(len(arg_list))]
            for i, fut in enumerate(futures):
                out.append(fut.result())
                bar.update(weights[i] if weights else 1)
        except BrokenProcessPool as exc:
            raise BunnyError(f"{desc}: a worker process died (out of memory?); the clusters it finished are "
                             f"kept: run again with --resume") from exc
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            _TASKS = None
            bar.close()
        return out

    def close(self):
        pass


def _call():
    """ForkCall's child: fn's result and the warnings it issued (re-issued by the parent)."""
    fn, args, nice = _CALL
    if nice:
        os.nice(nice)  # before fn starts threads: they inherit it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args)
    return result, [(str(w.message), w.category) for w in caught]


class ForkCall:
    """fn(*args) in a child forked now; `result()` waits for it and returns its value, raises
    its exception (BunnyError when the child died) and re-issues its warnings here. The
    arguments are inherited, not pickled; the result comes back pickled."""

    def __init__(self, fn, *args, desc: str, nice: int = 0):
        global _CALL
        self.desc = desc
        self.pool = _pool(1)
        _CALL = (fn, args, nice)
        try:
            self.future = self.pool.submit(_call)  # with fork, the child starts within submit
        finally:
            _CALL = None

    def result(self):
        try:
            value, caught = self.future.result()
        except BrokenProcessPool as exc:
            raise BunnyError(f"{self.desc}: its worker process died (out of memory?)") from exc
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        for message, category in caught:
            warnings.warn(message, category, stacklevel=2)
        return value
