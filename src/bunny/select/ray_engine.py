"""The Ray engine: the same shard and cluster tasks as the embedded engine, run as Ray
tasks. Tasks read the shards themselves (a shared filesystem, or URLs through fsspec) and
write their results atomically to OUT/_work, so the driver only schedules; steps 2-4 run on
the driver (they stream small survivor files). Without an address a local Ray is started
and stopped again; with one the run joins that cluster and only disconnects at the end."""
from __future__ import annotations

import os

from tqdm.auto import tqdm

from bunny.errors import BunnyError

# Seconds to wait for the head node named by --address to accept a connection.
CONNECT_TIMEOUT_S = 10


class RayMap:
    def __init__(self, workers: int, address: str | None = None):
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - ray is in the select extra
            raise BunnyError("--engine ray needs ray: pip install 'bunny[select]'") from exc
        self.ray = ray
        self.started = False  # connected here: disconnect (and stop a local Ray) on close
        if ray.is_initialized():
            return
        # the workers keep local copies of URL inputs where the driver is told to (storage.py)
        cache = os.environ.get("BUNNY_SELECT_CACHE")
        env = {"env_vars": {"BUNNY_SELECT_CACHE": cache}} if cache else None
        if address:
            _join(ray, address, env)
        else:
            # "local": a new Ray of our own, even where a cluster already runs on this machine
            # (ray.init() without an address would join that one)
            ray.init(address="local", num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False,
                     runtime_env=env)
        self.started = True

    def __call__(self, fn, arg_list, desc, show, weights=None):
        try:
            return self._run(fn, arg_list, desc, show, weights)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, without its frames
            error = _without_tracebacks(exc)
        # An ObjectRef still alive after ray.shutdown() ends the whole process when it is freed
        # (Ray: "The core worker has already been shutdown ... The process will exit"). The
        # frames of `_run` and of ray.get hold this run's refs, so the error leaves without them:
        # a caller that keeps the error (a notebook, a retry loop, pytest.raises) stays alive.
        raise error

    def _run(self, fn, arg_list, desc, show, weights):
        ray = self.ray
        # a failed task is retried once elsewhere (a node that dies mid-task); every task
        # writes its result atomically and skips work already written, so a retry is safe
        remote = ray.remote(max_retries=1)(fn)
        shared = {}  # big shared arguments (the centroids) go to the object store once
        refs = []
        for args in arg_list:
            put = []
            for a in args:
                if hasattr(a, "nbytes") and a.nbytes > 1 << 16:
                    if id(a) not in shared:
                        shared[id(a)] = ray.put(a)
                    put.append(shared[id(a)])
                else:
                    put.append(a)
            refs.append(remote.remote(*put))
        index = {r: i for i, r in enumerate(refs)}
        bar = tqdm(total=sum(weights) if weights else len(refs), desc=desc, disable=not show)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for r in done:
                    _get(ray, r, desc)  # a task's error is raised here
                    bar.update(weights[index[r]] if weights else 1)
        except BaseException:
            for r in pending:
                ray.cancel(r)
            raise
        finally:
            bar.close()
        return ray.get(refs)

    def close(self):
        if self.started:
            self.started = False
            self.ray.shutdown()  # a joined cluster keeps running: only this driver disconnects


def _join(ray, address: str, runtime_env: dict | None) -> None:
    """Connect to the cluster at `address` ("auto": the one started on this machine); a clear
    error when nothing answers there. A HOST:PORT is tried first with a plain TCP connection:
    ray.init would wait for a long time on an address where nothing listens."""
    import socket

    host, sep, port = address.rpartition(":")
    if address != "auto" and "://" not in address:
        if not sep or not port.isdigit():
            raise BunnyError(f"--address {address!r}: expected HOST:PORT of a Ray head node (or auto)")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise BunnyError(f"--address {address}: no Ray cluster answers there ({exc}); start one with "
                             f"`ray start --head` or check the address") from exc
    try:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    except ConnectionError as exc:
        raise BunnyError(f"--address {address}: could not join a Ray cluster there ({exc})") from exc


def _get(ray, ref, desc: str):
    """ray.get, with a dead node or worker process turned into an error naming the node and
    `--resume` (finished shards and clusters are kept)."""
    from ray.exceptions import NodeDiedError, ObjectLostError, OwnerDiedError, WorkerCrashedError

    try:
        return ray.get(ref)
    except (NodeDiedError, WorkerCrashedError, ObjectLostError, OwnerDiedError) as exc:
        raise BunnyError(f"{desc}: a Ray task failed twice because its worker or node died ({exc}); the "
                         f"shards and clusters finished are kept: run again with --resume") from exc


def _without_tracebacks(exc: BaseException) -> BaseException:
    """`exc` with the tracebacks of it and of the errors it was raised from dropped (the
    messages stay: a task's error carries its remote traceback as text)."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        stack += [e.__cause__, e.__context__]
    return exc
