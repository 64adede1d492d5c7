"""The selection rules as pure functions on arrays (no I/O): see docs/coreset.md.

Numerics: every value that decides a result is computed per row (or per pair) from that
row alone, so it cannot depend on which block, cluster order, worker or engine computed
it. Matrix products (BLAS) are only used to *find* candidate pairs; pairs whose BLAS
value lies within `REFINE` of the threshold are decided again by `pair_dots`.
"""
from __future__ import annotations

import numpy as np

# Worst-case float32 dot error for unit vectors of d <= 2048 is below 2048 * 2**-24 ~ 1.2e-4.
REFINE = 2e-4


def row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) dot of matching rows of two (n, d) arrays: exact float64 products, float64 sum,
    rounded to float32. Used for image-text scores and centroid cosines."""
    return (a.astype(np.float64) * b.astype(np.float64)).sum(axis=1).astype(np.float32)


def pair_dots(x: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(p,) float64 dots of rows x[i], x[j]: the canonical edge value near the threshold."""
    return (x[i].astype(np.float64) * x[j].astype(np.float64)).sum(axis=1)


def centroid_distance(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(n,) Euclidean distance of each row to centroid c, from that row alone (no
    |x|^2 - 2x.c + |c|^2 expansion), so bit-identical rows tie exactly."""
    diff = x.astype(np.float64) - c.astype(np.float64)[None, :]
    return np.sqrt((diff * diff).sum(axis=1))


def centroid_cosine(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(n,) float32 cosine between each row and the L2-normalised centroid."""
    c64 = c.astype(np.float64)
    chat = c64 / np.linalg.norm(c64)
    return row_dots(x, np.broadcast_to(chat, x.shape))


def collapse_identical(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit-identical rows -> (first: (u,) index of each distinct row's first occurrence,
    inverse: (n,) position of each row in `first`)."""
    v = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, inverse = np.unique(v, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # keep distinct rows in input order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse.ravel()]


def union_edges(parent: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union-find on arrays: merge the sets of i[k] and j[k] for every k. `parent` must be
    fully compressed (parent[parent] == parent); the result is too, and every set's root is
    its smallest member (roots hook only onto smaller roots, so no cycles can form)."""
    while len(i):
        ri, rj = parent[i], parent[j]
        diff = ri != rj
        if not diff.any():
            break
        ri, rj = ri[diff], rj[diff]
        i, j = i[diff], j[diff]
        np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))
        while True:  # pointer jumping until every node points at its root
            pp = parent[parent]
            if np.array_equal(pp, parent):
                break
            parent = pp
    return parent


def similarity_edges(x: np.ndarray, threshold: float, block: int = 0):
    """Yield (i, j) arrays, i < j, of the pairs of rows of x (float32, (n, d)) whose dot
    is strictly greater than `threshold`. Blocked upper triangle: memory is one
    (block, n) tile."""
    n = len(x)
    block = block or max(64, min(2048, (1 << 24) // max(n, 1)))  # tile <= ~16M floats
    for a in range(0, n, block):
        b = min(a + block, n)
        s = x[a:b] @ x[a:].T  # (b-a, n-a)
        diag = s[:, : b - a]
        diag[np.arange(b - a)[:, None] >= np.arange(b - a)[None, :]] = -np.inf  # keep j > i only
        ii, jj = np.nonzero(s > threshold - REFINE)  # candidates: one pass over the tile
        v = s[ii, jj]
        near = v <= threshold + REFINE
        if near.any():  # decide pairs close to the threshold from the rows alone
            ok = ~near
            ok[near] = pair_dots(x, ii[near] + a, jj[near] + a) > threshold
            ii, jj = ii[ok], jj[ok]
        yield ii + a, jj + a


def components(x: np.ndarray, threshold: float, block: int = 0) -> np.ndarray:
    """(n,) component label (smallest member index) of the graph joining rows of x whose
    dot exceeds `threshold`. Bit-identical rows are collapsed first: they are one node
    when their self-dot exceeds the threshold (always, for unit rows and threshold < 1)."""
    first, inverse = collapse_identical(x)
    u = x[first]
    parent = np.arange(len(u))
    for i, j in similarity_edges(u, threshold, block):
        parent = union_edges(parent, i, j)
    self_ok = pair_dots(u, np.arange(len(u)), np.arange(len(u))) > threshold
    label_u = first[parent]  # root's original index
    labels = label_u[inverse]
    # duplicates whose self-dot is not above the threshold are their own components
    lone = ~self_ok[inverse] & (np.arange(len(x)) != first[inverse])
    labels[lone] = np.flatnonzero(lone)
    return labels


def keep_upper_median(labels: np.ndarray, dist: np.ndarray, gid: np.ndarray) -> np.ndarray:
    """(n,) bool: one row per component, the member at position len // 2 when members
    are sorted by (distance to centroid, gid) ascending."""
    if not len(labels):
        return np.zeros(0, dtype=bool)
    order = np.lexsort((gid, dist, labels))
    lab = labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    sizes = np.diff(np.r_[starts, len(lab)])
    keep = np.zeros(len(labels), dtype=bool)
    keep[order[starts + sizes // 2]] = True
    return keep


def keep_semdedup(x: np.ndarray, dist: np.ndarray, gid: np.ndarray, eps: float,
                  block: int = 0) -> np.ndarray:
    """(n,) bool, SemDeDup's rule: rank rows by distance to the centroid descending (the
    paper's keep-hard order; ties by gid), drop a row when any earlier-ranked row (kept or
    not) has cosine > 1 - eps with it."""
    if not len(x):
        return np.zeros(0, dtype=bool)
    rank_order = np.lexsort((gid, -dist))
    rank = np.empty(len(x), dtype=np.int64)
    rank[rank_order] = np.arange(len(x))
    drop = np.zeros(len(x), dtype=bool)
    first, inverse = collapse_identical(x)
    u = x[first]
    # identical copies: every copy but the earliest-ranked has an earlier identical row
    self_ok = pair_dots(u, np.arange(len(u)), np.arange(len(u))) > 1 - eps
    best = np.full(len(u), np.iinfo(np.int64).max)
    np.minimum.at(best, inverse, rank)
    drop |= self_ok[inverse] & (rank != best[inverse])
    # distinct rows: an edge drops the later-ranked side; for a row standing for several
    # copies, its earliest copy is the one compared (later copies are dropped above)
    for i, j in similarity_edges(u, 1 - eps, block):
        later = np.where(best[i] > best[j], i, j)
        later_rows = np.isin(inverse, later)
        drop |= later_rows
    return ~drop


def window(n: int, lo: float, hi: float) -> tuple[int, int]:
    """Kept positions [int(lo*n), int(hi*n)) of n rows ordered by (score desc, gid asc)."""
    return int(lo * n), int(hi * n)


def desc_key(score: np.ndarray) -> np.ndarray:
    """uint64 key whose ascending order is float32 `score` descending (-0.0 == 0.0)."""
    s = np.asarray(score, dtype=np.float32) + np.float32(0.0)  # -0.0 -> 0.0
    bits = s.view(np.uint32).astype(np.uint64)
    asc = np.where((bits >> 31) == 1, (~bits) & 0xFFFFFFFF, bits | 0x80000000)
    return (0xFFFFFFFF - asc).astype(np.uint64)


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def draw_hash(gid: np.ndarray, seed: int) -> np.ndarray:
    """(n,) uint64 hash of (gid, seed); the draw keeps the n smallest (ties by gid), so it
    does not depend on how rows are split across shards, processes or machines."""
    s = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return splitmix64(np.asarray(gid, dtype=np.int64).astype(np.uint64) ^ s)
