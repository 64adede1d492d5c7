"""Step 1's clusters in forked worker processes: the embedded engine's map on Linux.

Threads share one GIL. Every numpy call on a cluster releases it and takes it back, and
with two threads each take-back may wait for the other thread's Python (and for an idle
core to wake): step 1 in two threads ran at ~85% of two separate processes on 2 cores, and
the gap grows with the thread count. Forked processes share nothing but the input pages
(read-only memory maps) and start in ~10 ms each: no imports, the tasks' arguments are
inherited, not pickled (`_TASKS`). Only the results (cluster sizes) come back.

Fork is only used where it is safe: Linux, CPU work (a CUDA context does not survive a
fork), and only for step 1, whose kernel uses no OpenMP (faiss's assignment, which does,
stays in threads: GNU OpenMP hangs in a child forked after it started its threads).
"""
from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from tqdm.auto import tqdm

from bunny.errors import BunnyError

_TASKS: tuple | None = None  # (fn, arg_list), set before the pool forks: children inherit it


def available() -> bool:
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


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
        pool = ProcessPoolExecutor(min(self.workers, max(1, len(arg_list))),
                                   mp_context=multiprocessing.get_context("fork"))
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
