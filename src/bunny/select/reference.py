"""The selection rules of shared/docs/coreset-spec.md, straightforwardly: every row in memory,
exact nearest centroids, a dense similarity product per cluster, union-find components,
full sorts for the windows and the draw (Bunny's step-1 rule; not `--mode semdedup`).

This is the path the engines are a fast layer over: they find the same edges with pruned,
tiled and quantised products, assign with faiss, stream the windows by radix selection, and
tests/select/test_select_reference.py requires identical ids from both. Memory: all rows and one
cluster's (n, n) product, so it is for tests and small inputs only. The per-row values that
decide a result (distance to the centroid, scores, the draw's hash) are the shared rule
functions of `rules`, each computed from its row alone.
"""
from __future__ import annotations

import numpy as np

from bunny.select import rules
from bunny.select.assign import exact_sq_dist
from bunny.select.layout import open_layout

# Pair values within this of the threshold are decided by the canonical per-pair dot
# (`rules.pair_dots`) instead of the float64 product, whose summation order differs.
_NEAR = 1e-9


def load(root, renormalize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(image rows, text rows) of a LAION-layout folder as float32, in gid order."""
    layout = open_layout(root, renormalize)
    img = [layout.rows_f32(layout.img(s.index), slice(None)) for s in layout.shards]
    txt = [layout.rows_f32(layout.txt(s.index), slice(None)) for s in layout.shards]
    return np.concatenate(img), np.concatenate(txt)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n,) nearest centroid of each row by exact L2 (float64, row by row); ties to the
    lower index (argmin's first)."""
    return exact_sq_dist(x, centroids).argmin(axis=1)


def edges(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(i, j), i < j, of the pairs of rows whose dot is strictly greater than `threshold`."""
    x64 = x.astype(np.float64)
    s = x64 @ x64.T
    i, j = np.nonzero(np.triu(s > threshold - _NEAR, k=1))
    near = np.abs(s[i, j] - threshold) <= _NEAR
    ok = s[i, j] > threshold
    ok[near] = rules.pair_dots(x, i[near], j[near]) > threshold
    return i[ok], j[ok]


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(n,) label of each node's component (its smallest member) for edges (i, j):
    union-find with path halving; every root is the smallest member of its set."""
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(n)], dtype=np.int64)


def dedup(x: np.ndarray, gid: np.ndarray, centroid: np.ndarray, threshold: float) -> np.ndarray:
    """Step 1 in one cluster: the gids kept, one per component, the member at len // 2 when
    sorted by (distance to the centroid, gid)."""
    labels = components(len(x), *edges(x, threshold))
    dist = rules.centroid_distance(x, centroid)
    kept = []
    for lab in np.unique(labels):
        members = np.flatnonzero(labels == lab)
        members = members[np.lexsort((gid[members], dist[members]))]
        kept.append(gid[members[len(members) // 2]])
    return np.array(kept, dtype=np.int64)


def window(gid: np.ndarray, score: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The gids at positions [int(lo n), int(hi n)) when ordered by (score desc, gid asc)."""
    order = np.lexsort((gid, -score.astype(np.float64)))  # -0.0 and 0.0 compare equal
    a, b = rules.window(len(gid), lo, hi)
    return np.sort(gid[order[a:b]])


def select(root, centroids: np.ndarray, threshold: float = 0.86, clip_window=(0.40, 0.60),
           centroid_window=(0.15, 0.35), n: int | None = None, seed: int = 0,
           renormalize: bool = False) -> dict[str, np.ndarray]:
    """Every stage's surviving gids (sorted) and each row's cluster:
    {"cluster", "dedup", "clip", "centroid", "selected"}."""
    x, t = load(root, renormalize)
    centroids = np.asarray(centroids, np.float32)
    cluster = assign(x, centroids)
    gid = np.arange(len(x), dtype=np.int64)
    kept = [dedup(x[cluster == c], gid[cluster == c], centroids[c], threshold) for c in range(len(centroids))]
    s1 = np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
    s2 = window(s1, rules.row_dots(x[s1], t[s1]), *clip_window)
    cos = np.array([rules.centroid_cosine(x[g:g + 1], centroids[cluster[g]])[0] for g in s2], np.float32)
    s3 = window(s2, cos, *centroid_window)
    order = np.lexsort((s3, rules.draw_hash(s3, seed)))
    s4 = np.sort(s3[order[: len(s3) if n is None else n]])
    return {"cluster": cluster, "dedup": s1, "clip": s2, "centroid": s3, "selected": s4}
