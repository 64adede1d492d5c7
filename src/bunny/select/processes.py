"""Step 1's clusters in worker processes (`ProcessMap`), on Linux with the embedded engine.

In threads, every numpy call on a cluster releases the GIL and takes it back, and each
take-back may wait for another thread's Python; separate processes share nothing but the
input pages (read-only memory maps). The pool's processes are forked: they need no imports,
and the task list reaches them once through the pool's initializer (inherited, not
pickled); each task is then an index into it, and only its result (cluster sizes) comes
back. Forking is only used for CPU work: a CUDA context does not survive a fork, and step 1's
kernel uses no OpenMP (GNU OpenMP hangs in a child forked after its thread pool started,
when the child asks for a team of several threads).
"""
from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from tqdm.auto import tqdm

from bunny.errors import BunnyError

_WORKER_TASKS: tuple | None = None  # in a worker process: (fn, arg_list), set by its initializer


def available() -> bool:
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _init(fn, arg_list) -> None:
    global _WORKER_TASKS
    _WORKER_TASKS = (fn, arg_list)


def _run(i: int):
    fn, arg_list = _WORKER_TASKS
    return fn(*arg_list[i])


class ProcessMap:
    """`engine.LocalMap`'s interface with a process per worker, a new pool for each call."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)

    def __call__(self, fn, arg_list, desc, show, weights=None):
        pool = ProcessPoolExecutor(min(self.workers, max(1, len(arg_list))), initializer=_init,
                                   initargs=(fn, arg_list), mp_context=multiprocessing.get_context("fork"))
        try:
            return results([pool.submit(_run, i) for i in range(len(arg_list))], desc, show, weights)
        except BrokenProcessPool as exc:
            raise BunnyError(f"{desc}: a worker process died (out of memory?); the clusters it finished are "
                             f"kept: run again with --resume") from exc
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self):
        pass


def results(futures, desc: str, show: bool, weights=None) -> list:
    """The futures' results in order (a task's error is raised here), with a progress bar
    advanced by each task's weight."""
    bar = tqdm(total=sum(weights) if weights else len(futures), desc=desc, disable=not show)
    try:
        out = []
        for i, fut in enumerate(futures):
            out.append(fut.result())
            bar.update(weights[i] if weights else 1)
        return out
    finally:
        bar.close()
