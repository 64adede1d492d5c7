"""The Ray engine: the same shard and cluster tasks as the embedded engine, run as Ray
tasks. Tasks read the shards from the shared filesystem and write their results
atomically to OUT/_work, so the driver only schedules; steps 2-4 run on the driver
(they stream small survivor files). Without an address a lean local Ray is started (`ray_local.py`)."""
from __future__ import annotations

from tqdm.auto import tqdm

from bunny.errors import BunnyError


class RayMap:
    def __init__(self, workers: int, address: str | None = None):
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - ray is in the select extra
            raise BunnyError("--engine ray needs ray: pip install 'bunny[select]'") from exc
        self.ray = ray
        self.started = False  # connected here: disconnect (and stop a local Ray) on close
        self.lean: list[str] = []
        self._restore = None  # of the lean serialization add-ons (ray_local.lean_serialization)
        if not ray.is_initialized():
            from bunny.select.ray_local import lean_serialization, start_local

            self._restore = lean_serialization()  # this driver's context is built after this
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    self.lean = start_local(ray, workers)  # the private-API patches applied (for the tests)
            except BaseException:
                self._restore_addons()
                raise
            self.started = True

    def __call__(self, fn, arg_list, desc, show, weights=None):
        ray = self.ray
        remote = ray.remote(fn)
        # big shared arguments (the centroids) go to the object store once
        shared = {}
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
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for r in done:
                ray.get(r)  # raise a task's error here
                bar.update(weights[index[r]] if weights else 1)
        bar.close()
        return ray.get(refs)

    def close(self):
        if self.started:
            self.started = False
            try:
                self.ray.shutdown()  # a joined cluster keeps running: only this driver disconnects
            finally:
                self._restore_addons()

    def _restore_addons(self):
        if self._restore is not None:
            self._restore()
            self._restore = None

