"""Per-cluster work, shared by every engine: gather a cluster's rows from the memory-mapped
shards, apply step 1, score the survivors, write the result atomically.

A cluster's rows are found through the per-shard assignment files written by
`assign_shard`: `order_NNNN.npy` (the shard's rows sorted by cluster, stable) and
`bounds_NNNN.npy` ((k+1,) offsets into it), so reading one cluster touches only its rows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from bunny.atomic import atomic_file
from bunny.errors import BunnyError
from bunny.select import rules
from bunny.select.assign import Assigner
from bunny.select.layout import Layout, open_npy


@dataclass(frozen=True)
class KernelParams:
    mode: str = "bunny"  # "bunny" (components, upper median) or "semdedup"
    threshold: float = 0.86  # bunny: edge when dot > threshold
    eps: float = 0.14  # semdedup: drop when cosine > 1 - eps with an earlier-ranked row
    block: int = 65536  # rows per read block during assignment
    device: str = "cpu"  # "cpu": numpy + faiss; "cuda[:N]" / "torch-cpu": torch (gpu.py)
    products: str = "int8"  # device "cpu": products of the pruning bound (rules.similarity_edges)
    threads: int = 1  # threads of each int8 product (cores per cluster in flight)
    blas_threads: int = 0  # > 0: limit BLAS to this many threads in the task's process (Ray)


def atomic_save(path: Path, **arrays) -> None:
    """np.savez through `bunny.atomic`: a killed run never leaves a partial file."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def atomic_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def remove_stale_temps(work: Path) -> None:
    """Delete the temporary files of `atomic_save`/`atomic_npy` that a killed writer left in
    the work folder (a worker process killed mid-write: the final file was never replaced,
    so nothing is lost). Only while no task of this run is writing."""
    for sub in ("clusters", "assign"):
        for p in (work / sub).glob(".*.tmp"):
            p.unlink(missing_ok=True)


def make_assigner(centroids: np.ndarray, device: str = "cpu", threads: int = 0):
    if device == "cpu":
        return Assigner(centroids, threads)
    from bunny.select.gpu import TorchAssigner

    return TorchAssigner(centroids, device)


def assign_shard(layout: Layout, shard: int, centroids: np.ndarray, work: Path, block: int = 65536,
                 device: str = "cpu", threads: int = 0) -> int:
    """Assign every row of one shard; write its order/bounds files. Skips finished shards.
    `threads` > 0: OpenMP threads of the faiss search in this thread (`Assigner`)."""
    bounds_path = work / "assign" / f"bounds_{shard:04d}.npy"
    if bounds_path.exists():
        return 0
    assigner = make_assigner(centroids, device, threads)
    s = layout.shards[shard]
    img = layout.img(shard)
    labels = np.empty(s.rows, dtype=np.int32)
    raw = device != "cpu" and not layout.renormalize  # the device converts to float32 itself
    for a in range(0, s.rows, block):
        rows = np.array(img[a:a + block]) if raw else layout.rows_f32(img, slice(a, a + block))
        labels[a:a + block] = assigner(rows)
    write_assignment(work, shard, labels, len(centroids))
    return s.rows


def write_assignment(work: Path, shard: int, labels: np.ndarray, k: int) -> None:
    """One shard's order/bounds files from its (n,) labels (see the module docstring)."""
    order = np.argsort(labels, kind="stable").astype(np.int64)
    bounds = np.searchsorted(labels[order], np.arange(k + 1)).astype(np.int64)
    atomic_npy(work / "assign" / f"order_{shard:04d}.npy", order)
    atomic_npy(work / "assign" / f"bounds_{shard:04d}.npy", bounds)  # written last: its presence marks the shard done


_INDEX: dict = {}


def _assign_index(layout: Layout, work: Path):
    """(S, k+1) bounds of every shard, loaded once per process and run folder."""
    key = (str(work), len(layout.shards))
    hit = _INDEX.get(key)
    paths = [work / "assign" / f"bounds_{s.index:04d}.npy" for s in layout.shards]
    stamp = tuple((st.st_mtime_ns, st.st_ino) for st in map(os.stat, paths))
    if hit is None or hit[0] != stamp:
        hit = (stamp, np.stack([np.load(p) for p in paths]) if paths else np.zeros((0, 1), np.int64))
        _INDEX.clear()
        _INDEX[key] = hit
    return hit[1]


def cluster_rows(layout: Layout, work: Path, c: int):
    """(shard, rows) pairs of cluster c, in gid order."""
    bounds = _assign_index(layout, work)
    for s in layout.shards:
        a, b = int(bounds[s.index, c]), int(bounds[s.index, c + 1])
        if b > a:
            order = open_npy(work / "assign" / f"order_{s.index:04d}.npy")
            yield s, np.asarray(order[a:b])


def cluster_file(work: Path, c: int) -> Path:
    return work / "clusters" / f"c_{c:07d}.npz"


def run_cluster(layout: Layout, work: Path, c: int, centroid: np.ndarray, p: KernelParams) -> int:
    """Step 1 on cluster c and scores of its survivors -> clusters/c_NNNNNNN.npz.
    Returns the cluster's size; skips clusters already done (resume)."""
    path = cluster_file(work, c)
    if path.exists():
        return -1
    parts = list(cluster_rows(layout, work, c))
    # identical rows are found on the stored values (float16: half the bytes to hash), and
    # only the distinct ones are converted to float32: row i of the cluster is u[inverse[i]]
    raw = layout.gather_stored(layout.img, parts)
    first, inverse = rules.collapse_identical(raw)
    rows = rules.Distinct(layout.stored_to_f32(raw, first), first, inverse)
    del raw
    u = rows.u
    gid = np.concatenate([s.offset + r for s, r in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
    if p.device != "cpu":
        from bunny.select.gpu import torch_edges

        edges = torch_edges(p.device)
    else:
        edges = partial(rules.similarity_edges, products=p.products, threads=p.threads)
    if p.mode == "bunny":
        labels = rules.distinct_components(rows, p.threshold, edges=edges)
        size = np.bincount(labels, minlength=len(labels))
        # the distance only orders members of a component: singletons need none
        dist = np.zeros(len(labels))
        multi = np.flatnonzero(size[labels] > 1)
        dist[multi] = rules.centroid_distance(u, centroid, inverse[multi])
        keep = rules.keep_upper_median(labels, dist, gid)
        comp_sizes = np.bincount(size[size > 0]) if len(labels) else np.zeros(1, np.int64)
    else:
        dist = rules.centroid_distance(u, centroid, inverse)
        keep = rules.distinct_semdedup(rows, dist, gid, p.eps, edges=edges)
        comp_sizes = np.zeros(1, np.int64)
    kept = np.flatnonzero(keep)
    clip, cos = _scores(layout, parts, kept, rows, centroid)
    atomic_save(path, gid=gid[kept], clip=clip, cos=cos, size=np.int64(len(gid)),
                comp_sizes=comp_sizes.astype(np.int64))
    return len(gid)


def _scores(layout: Layout, parts, kept: np.ndarray, rows: rules.Distinct, centroid: np.ndarray,
            chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Image-text scores and centroid cosines of the cluster's rows at positions `kept`
    (sorted). Text rows are read for survivors only, `chunk` at a time: the cluster's text
    matrix is never held whole (it would be as large as its image rows)."""
    starts = np.cumsum([0] + [len(r) for _, r in parts], dtype=np.int64)
    clip, cos = np.empty(len(kept), np.float32), np.empty(len(kept), np.float32)
    for a in range(0, len(kept), chunk):
        pos = kept[a:a + chunk]
        part = np.searchsorted(starts, pos, side="right") - 1  # kept is sorted: parts in order
        txt = layout.gather_f32(layout.txt, [(parts[i][0], parts[i][1][pos[part == i] - starts[i]])
                                             for i in np.unique(part)])
        clip[a:a + chunk], cos[a:a + chunk] = rules.clip_and_cosine(rows.u, txt, centroid, rows.inverse[pos])
    return clip, cos


def blas_threads(n: int):
    """Context manager: BLAS (numpy's and faiss's OpenBLAS) uses at most n threads inside.
    With W shards or clusters in flight on C cores, C // W threads each: two clusters with
    one thread each beat one cluster at a time with two (the thresholding and I/O between
    products then overlap instead of leaving a core idle). OpenMP's count (faiss's searches)
    is per thread, so a limit here would not reach the worker threads: `Assigner` sets it in
    each."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError as exc:  # pragma: no cover - threadpoolctl is in the select extra
        raise BunnyError("bunny data select needs threadpoolctl: pip install 'bunny[select]'") from exc
    return threadpool_limits(limits=max(1, n), user_api="blas")


def run_clusters(layout: Layout, work: Path, ids, centroids: np.ndarray, p: KernelParams) -> list[int]:
    """A batch of clusters (the unit of work of one task)."""
    if p.blas_threads:  # a Ray worker process: it runs one task at a time on one CPU
        blas_threads(p.blas_threads)  # not restored: the limit is for this worker process
    return [run_cluster(layout, work, int(c), centroids[int(c)], p) for c in ids]
