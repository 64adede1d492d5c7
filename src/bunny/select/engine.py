"""`select`: the whole coreset selection, on the embedded engine or on Ray.

Stages: validate input -> centroids -> assign shards -> step 1 per cluster -> steps 2-4
and outputs. The engines differ only in how the per-shard and per-cluster tasks are run
(`LocalMap`'s threads here, with step 1 in worker processes on Linux:
`processes.ProcessMap`; `RayMap` in ray_engine.py); everything that decides a result is shared.
Work state lives in OUT/_work; every file there is written atomically, so `--resume`
continues a killed run, skipping finished shards and clusters.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bunny.errors import BunnyError
from bunny.select import assign as assign_mod
from bunny.select import processes, rules
from bunny.select.kernel import (KernelParams, assign_shard, atomic_npy, blas_threads, remove_stale_temps,
                                 run_clusters, write_assignment)
from bunny.select.layout import check_values, open_layout
from bunny.select.output import KeyPrefetch, Steps, window_scores, write_json, write_outputs

# Parameters that change the result: a resumed run must match them exactly.
_RESULT_PARAMS = ("input", "centroids", "k", "seed", "threshold", "clip_window", "centroid_window",
                  "n", "mode", "eps", "renormalize", "kmeans_sample")


@dataclass
class SelectConfig:
    input: str
    out: str
    centroids: str | None = None  # .npy (k, d); else k-means with k and seed
    k: int | None = None
    seed: int = 0  # k-means sample and fit, and the final draw
    threshold: float = 0.86
    clip_window: tuple[float, float] = (0.40, 0.60)
    centroid_window: tuple[float, float] = (0.15, 0.35)
    n: int | None = None  # rows to draw at the end; None keeps all step-3 survivors
    mode: str = "bunny"  # or "semdedup"
    eps: float = 0.14  # semdedup only
    engine: str = "local"  # or "ray"
    device: str = "cpu"  # "cuda[:N]": assignment and similarity with torch on a GPU; "torch-cpu"
    products: str = "int8"  # device cpu: products of step 1's pruning bound, "int8" or "float32" (same ids)
    workers: int = 0  # tasks at once; 0: one per available core
    fork: bool = True  # local engine on Linux: step 1 in worker processes (False: threads; processes.py)
    address: str | None = None  # ray: join this cluster instead of starting a local one
    renormalize: bool = False
    overwrite: bool = False
    resume: bool = False
    kmeans_sample: int = 0  # rows for k-means; 0 = 256 per centroid
    cluster_batch: int = 0  # clusters per task; 0 = about 4 tasks per worker
    progress: bool = True
    timings: dict = field(default_factory=dict)

    def result_params(self) -> dict:
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in _RESULT_PARAMS}


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class LocalMap:
    """Runs tasks in this process (threads: numpy's BLAS and I/O release the GIL)."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)

    def __call__(self, fn, arg_list, desc, show, weights=None):
        with ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(fn, *args) for args in arg_list]
            try:
                return processes.results(futures, desc, show, weights)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def close(self):
        pass


def _check_out(cfg: SelectConfig) -> bool:
    """Refuse a non-empty output folder unless --overwrite/--resume (checked before any
    work, and before anything is written). Returns whether the folder must be cleared."""
    out = Path(cfg.out)
    work = out / "_work"
    if out.exists() and any(out.iterdir()):
        if cfg.overwrite:
            return True
        elif cfg.resume:
            import json

            saved = work / "params.json"
            if not saved.exists():
                raise BunnyError(f"--resume: {out} holds no run to resume (no _work/params.json)")
            old = json.loads(saved.read_text())
            if old != cfg.result_params():
                diff = sorted(k for k in old if old[k] != cfg.result_params().get(k))
                raise BunnyError(f"--resume: {out} was started with different parameters ({', '.join(diff)})")
        else:
            raise BunnyError(f"output folder {out} is not empty: pass --overwrite to replace it "
                             f"or --resume to continue an interrupted run")
    return False


def _prepare_out(cfg: SelectConfig, clear: bool) -> Path:
    out = Path(cfg.out)
    work = out / "_work"
    if clear:
        shutil.rmtree(out)
    for sub in ("assign", "clusters"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    write_json(work / "params.json", cfg.result_params())
    return out


# Rows are assigned during the value check (one pass over the image rows instead of two)
# when the centroids are known before it and the labels, 4 bytes a row, stay small;
# otherwise (k-means, GPU, larger inputs) assignment is a pass of its own. On Ray the check
# runs on the driver while Ray starts, so the driver assigns only when that is little work
# (rows x centroids below FUSED_RAY_MAX_WORK); larger assignments are Ray tasks, spread over
# the cluster.
FUSED_ASSIGN_MAX_ROWS = 1 << 26
FUSED_RAY_MAX_WORK = 1 << 26


def _early_centroids(cfg: SelectConfig, layout, clear: bool) -> np.ndarray | None:
    """The centroids when they are known before the value check: a resumed run's saved
    ones, or --centroids FILE; None when k-means must fit them on the checked input."""
    saved = Path(cfg.out) / "centroids.npy"
    if cfg.resume and not clear and saved.exists():
        return assign_mod.load_centroids(saved, layout.dim)
    if cfg.centroids:
        return assign_mod.load_centroids(cfg.centroids, layout.dim)
    return None


def _centroids(cfg: SelectConfig, layout, out: Path, show: bool, known: np.ndarray | None) -> np.ndarray:
    """The run's centroids: `known` (a resumed run's saved ones or --centroids FILE, loaded
    before the check by `_early_centroids`), else fitted by k-means; saved with the output."""
    c = known
    if c is None:
        if not cfg.k:
            raise BunnyError("give --centroids FILE or --k K (with --seed) to fit them")
        if show:
            print(f"k-means: k={cfg.k} seed={cfg.seed}")
        c = assign_mod.fit_kmeans(layout, cfg.k, cfg.seed, cfg.kmeans_sample)
    saved = out / "centroids.npy"
    if not saved.exists():  # a resumed run keeps the file it started with
        atomic_npy(saved, c)
    return c


def _check_params(cfg: SelectConfig):
    if cfg.mode not in ("bunny", "semdedup"):
        raise BunnyError(f"--mode {cfg.mode!r}: choose one of bunny, semdedup")
    if cfg.products not in rules.PRODUCTS:
        raise BunnyError(f"--products {cfg.products!r}: choose one of {', '.join(rules.PRODUCTS)}")
    if cfg.engine not in ("local", "ray"):
        raise BunnyError(f"--engine {cfg.engine!r}: choose one of local, ray")
    if cfg.device != "cpu":
        if cfg.engine != "local":
            raise BunnyError(f"--device {cfg.device} runs on the embedded engine (--engine local)")
        from bunny.select.gpu import torch_device

        torch_device(cfg.device)  # fails now, before any work, if the device is missing
    for name in ("clip_window", "centroid_window"):
        lo, hi = getattr(cfg, name)
        if not 0.0 <= lo <= hi <= 1.0:
            raise BunnyError(f"--{name.replace('_', '-')} {lo} {hi}: need 0 <= lo <= hi <= 1")
    if cfg.workers < 0:
        raise BunnyError(f"--workers {cfg.workers}: must be >= 1 (or 0 for one per core)")
    if cfg.n is not None and cfg.n < 0:
        raise BunnyError(f"--n {cfg.n}: must be >= 0")


def select(cfg: SelectConfig) -> dict:
    """Run the coreset selection described by `cfg`; returns report.json's content."""
    _check_params(cfg)
    show = cfg.progress
    workers = cfg.workers or available_cores()
    t0 = time.perf_counter()
    layout = open_layout(cfg.input, cfg.renormalize)
    clear = _check_out(cfg)
    # bad values fail before the output folder is touched
    ray = cfg.engine == "ray"
    per_worker = max(1, available_cores() // workers)  # the cores each of W tasks in flight gets
    threads = 1 if ray else per_worker
    known = _early_centroids(cfg, layout, clear)
    fuse = (known is not None and cfg.device == "cpu" and layout.rows <= FUSED_ASSIGN_MAX_ROWS
            and not (ray and layout.rows * len(known) > FUSED_RAY_MAX_WORK))
    # the check's worker threads share the cores (also on Ray's driver): faiss gets C // W in each
    assigner = assign_mod.Assigner(known, per_worker) if fuse else None
    if ray:
        mapper, labels = _ray_during_check(layout, workers, cfg.address, show, assigner)
    else:
        with blas_threads(threads):
            labels = _check(layout, workers, show, assigner)
        mapper = LocalMap(workers)
    t = {"check": time.perf_counter() - t0}
    work = None
    try:
        out = _prepare_out(cfg, clear)
        work = out / "_work"
        centroids = _centroids(cfg, layout, out, show, known)
        k = len(centroids)
        t["centroids"] = time.perf_counter() - t0 - sum(t.values())
        block = 16384 if cfg.device == "cpu" else 262144
        if labels is not None:  # assigned during the check
            for s in layout.shards:
                if not (work / "assign" / f"bounds_{s.index:04d}.npy").exists():
                    write_assignment(work, s.index, labels[s.index], k)
        else:
            with blas_threads(threads):
                mapper(assign_shard, [(layout, s.index, centroids, work, block, cfg.device, threads)
                                      for s in layout.shards], "assign", show, weights=[s.rows for s in layout.shards])
        sizes = np.zeros(k, np.int64)
        for s in layout.shards:
            sizes += np.diff(np.load(work / "assign" / f"bounds_{s.index:04d}.npy"))
        atomic_npy(out / "cluster_sizes.npy", sizes)
        t["assign"] = time.perf_counter() - t0 - sum(t.values())
        batches = _batches(sizes, cfg, workers)
        # Ray tasks (one CPU each) limit BLAS in their own process (KernelParams.blas_threads);
        # here the limit is for the whole stage
        params = KernelParams(cfg.mode, cfg.threshold, cfg.eps, device=cfg.device, products=cfg.products,
                              threads=threads, blas_threads=1 if ray else 0)
        remove_stale_temps(work)  # a killed run's (--resume): no task of this run has started
        with blas_threads(threads):
            _step1_map(mapper, ray, cfg, workers)(
                run_clusters, [(layout, work, b, centroids, params) for b in batches], "step 1 (dedup)", show,
                weights=[int(sizes[b].sum()) for b in batches])
    except BaseException:
        mapper.close()
        if work is not None and not cfg.address:  # every writer has stopped (a joined cluster's may not have)
            remove_stale_temps(work)
        raise
    # steps 2-4 need no engine: Ray shuts down in the background meanwhile
    closing = threading.Thread(target=mapper.close, name="select-engine-close")
    closing.start()
    try:
        return _finish(cfg, layout, out, work, k, workers, t, t0, show)
    finally:
        closing.join()


def _step1_map(mapper, ray: bool, cfg: SelectConfig, workers: int):
    """Step 1's map: Ray's, else worker processes where they are safe (`processes`), else threads."""
    if cfg.fork and not ray and workers > 1 and cfg.device == "cpu" and processes.available():
        return processes.ProcessMap(workers)
    return mapper


def _finish(cfg: SelectConfig, layout, out: Path, work: Path, k: int, workers: int, t: dict, t0: float,
            show: bool) -> dict:
    """Steps 2-4, the output files and report.json."""
    t["dedup"] = time.perf_counter() - t0 - sum(t.values())
    keys = KeyPrefetch(layout)  # the key columns are read while the windows are computed
    try:
        steps = Steps(work, k, cfg.clip_window, cfg.centroid_window, cfg.n, cfg.seed, show)
    except BaseException:
        keys.close()
        raise
    t["windows"] = time.perf_counter() - t0 - sum(t.values())
    written = write_outputs(layout, out, work, k, steps, show, keys)
    t["write"] = time.perf_counter() - t0 - sum(t.values())
    comp = np.zeros(1, np.int64)
    for c in range(k):
        cs = np.load(work / "clusters" / f"c_{c:07d}.npz")["comp_sizes"]
        comp = np.pad(comp, (0, max(0, len(cs) - len(comp)))) + np.pad(cs, (0, max(0, len(comp) - len(cs))))
    report = {"params": cfg.result_params(), "engine": cfg.engine, "device": cfg.device, "workers": workers,
              "input": {"rows": layout.rows, "shards": len(layout.shards), "dim": layout.dim},
              "k": k, "rows_after": {"input": layout.rows, "dedup": steps.n1, "clip": steps.w2.kept,
                                     "centroid": steps.w3.kept, "selected": steps.w4.kept},
              "window_edges": window_scores(steps),
              "component_sizes": {str(s): int(n) for s, n in enumerate(comp) if n},
              "seconds": {k_: round(v, 3) for k_, v in t.items()}, **written}
    write_json(out / "report.json", report)
    cfg.timings.update(t)
    return report


def _check(layout, workers: int, show: bool, assigner=None) -> list | None:
    """The value check (`check_values`); with an `Assigner`, each shard's labels too."""
    desc = "check values" if assigner is None else "check values + assign"
    bar = tqdm(total=2 * layout.rows, desc=desc, unit="row", disable=not show)
    try:
        return check_values(layout, progress=bar, workers=workers, assign=assigner)[1]
    finally:
        bar.close()


def _ray_during_check(layout, workers: int, address: str | None, show: bool, assigner=None):
    """(RayMap, labels), Ray started (or joined) while the value check (and the assignment,
    with an `assigner`) runs in a thread beside it: Ray's start-up is a chain of processes,
    each started when the one before is up, and leaves CPU time for the check. A failed check
    shuts Ray down again and raises the check's error; a bad input is reported before a Ray
    that cannot start."""
    from bunny.select.ray_engine import RayMap

    with ThreadPoolExecutor(1) as pool:
        check = pool.submit(_check, layout, workers, show, assigner)
        try:
            mapper = RayMap(workers, address)
        except BaseException:
            check.result()  # a bad input is the error to report first
            raise
        try:
            labels = check.result()
        except BaseException:
            mapper.close()
            raise
    return mapper, labels


def _batches(sizes: np.ndarray, cfg: SelectConfig, workers: int) -> list[np.ndarray]:
    """Cluster ids grouped into tasks, largest clusters first (load balance only: the
    result does not depend on the grouping)."""
    order = np.argsort(-sizes, kind="stable")
    per = cfg.cluster_batch or max(1, len(order) // (4 * max(1, workers)))
    return [order[i:i + per] for i in range(0, len(order), per)]
