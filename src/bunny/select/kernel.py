"""Per-cluster work, shared by every engine: gather a cluster's rows from the memory-mapped
shards, apply step 1, score the survivors, write the result atomically.

A cluster's rows are found through the per-shard assignment files written by
`assign_shard`: `order_NNNN.npy` (the shard's rows sorted by cluster, stable) and
`bounds_NNNN.npy` ((k+1,) offsets into it), so reading one cluster touches only its rows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bunny.select import rules
from bunny.select.assign import Assigner
from bunny.select.layout import Layout


@dataclass(frozen=True)
class KernelParams:
    mode: str = "bunny"  # "bunny" (components, upper median) or "semdedup"
    threshold: float = 0.86  # bunny: edge when dot > threshold
    eps: float = 0.14  # semdedup: drop when cosine > 1 - eps with an earlier-ranked row
    block: int = 65536  # rows per read block during assignment


def atomic_save(path: Path, **arrays) -> None:
    """np.savez to a temporary name, then os.replace: a killed run never leaves a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def atomic_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def assign_shard(layout: Layout, shard: int, centroids: np.ndarray, work: Path, block: int = 65536) -> int:
    """Assign every row of one shard; write its order/bounds files. Skips finished shards."""
    bounds_path = work / "assign" / f"bounds_{shard:04d}.npy"
    if bounds_path.exists():
        return 0
    assigner = Assigner(centroids)
    s = layout.shards[shard]
    img = layout.img(shard)
    labels = np.empty(s.rows, dtype=np.int32)
    for a in range(0, s.rows, block):
        labels[a:a + block] = assigner(layout.rows_f32(img, slice(a, a + block)))
    order = np.argsort(labels, kind="stable").astype(np.int64)
    bounds = np.searchsorted(labels[order], np.arange(len(centroids) + 1)).astype(np.int64)
    atomic_npy(work / "assign" / f"order_{shard:04d}.npy", order)
    atomic_npy(bounds_path, bounds)  # written last: its presence marks the shard done
    return s.rows


def cluster_rows(layout: Layout, work: Path, c: int):
    """(shard, rows) pairs of cluster c, in gid order."""
    for s in layout.shards:
        bounds = np.load(work / "assign" / f"bounds_{s.index:04d}.npy", mmap_mode="r")
        a, b = int(bounds[c]), int(bounds[c + 1])
        if b > a:
            order = np.load(work / "assign" / f"order_{s.index:04d}.npy", mmap_mode="r")
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
    if parts:
        img = np.concatenate([layout.rows_f32(layout.img(s.index), r) for s, r in parts])
        gid = np.concatenate([s.offset + r for s, r in parts]).astype(np.int64)
    else:
        img, gid = np.zeros((0, layout.dim), np.float32), np.zeros(0, np.int64)
    dist = rules.centroid_distance(img, centroid)
    if p.mode == "bunny":
        labels = rules.components(img, p.threshold)
        keep = rules.keep_upper_median(labels, dist, gid)
        comp_sizes = np.bincount(np.bincount(labels)[np.unique(labels)]) if len(labels) else np.zeros(1, np.int64)
    else:
        keep = rules.keep_semdedup(img, dist, gid, p.eps)
        comp_sizes = np.zeros(1, np.int64)
    # text rows only for survivors: the text matrix is never needed whole
    txt_parts, at = [], 0
    for s, r in parts:
        k = keep[at:at + len(r)]
        txt_parts.append(layout.rows_f32(layout.txt(s.index), r[k]))
        at += len(r)
    txt = np.concatenate(txt_parts) if txt_parts else np.zeros((0, layout.dim), np.float32)
    kept = img[keep]
    atomic_save(path, gid=gid[keep], clip=rules.row_dots(kept, txt),
                cos=rules.centroid_cosine(kept, centroid), size=np.int64(len(gid)),
                comp_sizes=comp_sizes.astype(np.int64))
    return len(gid)


def run_clusters(layout: Layout, work: Path, ids, centroids: np.ndarray, p: KernelParams) -> list[int]:
    """A batch of clusters (the unit of work of one task)."""
    return [run_cluster(layout, work, int(c), centroids[int(c)], p) for c in ids]
