"""The selection rules as pure functions on arrays (no I/O): see docs/coreset.md.

Numerics: every value that decides a result is computed per row (or per pair) from that
row alone, so it cannot depend on which block, cluster order, worker or engine computed
it. Matrix products (BLAS) are only used to *find* candidate pairs; pairs whose BLAS
value lies within `REFINE` of the threshold are decided again by `pair_dots`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Worst-case float32 dot error for unit vectors of d <= 2048 is below 2048 * 2**-24 ~ 1.2e-4.
REFINE = 2e-4


# Rows per chunk of the float64 per-row computations: the float64 copies of a chunk stay in
# cache (whole-cluster copies cost ~4x more in memory traffic). Each row's value is the
# same whatever the chunking: it is computed from that row alone.
_ROWS = 128


def _chunks(n: int, rows: np.ndarray | None):
    """(out slice, row selector) pairs over n rows (or over `rows` of the array) in
    chunks of _ROWS: the per-row functions gather a chunk at a time instead of copying
    every selected row first."""
    for s in range(0, n, _ROWS):
        yield slice(s, s + _ROWS), (slice(s, s + _ROWS) if rows is None else rows[s:s + _ROWS])


def row_dots(a: np.ndarray, b: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """(n,) dot of matching rows of a[rows] (all of `a` when rows is None) and b: exact
    float64 products, float64 sum (`_dot64`), rounded to float32. Used for image-text
    scores and centroid cosines. `b` may be one (d,) row, shared by every row."""
    n = len(a) if rows is None else len(rows)
    out = np.empty(n, np.float32)
    shared = b.ndim == 1
    b64 = b.astype(np.float64) if shared else None
    for o, r in _chunks(n, rows):
        out[o] = _dot64(a[r].astype(np.float64), b64 if shared else b[o].astype(np.float64))
    return out


def _dot64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise float64 dots of a (m, d) with b (m, d) or (d,). einsum sums each row with
    one fixed loop whatever the row count or the memory alignment (tested), without the
    (m, d) temporary of (a * b).sum(axis=1)."""
    return np.einsum("ij,ij->i" if b.ndim == 2 else "ij,j->i", a, b)


def pair_dots(x: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(p,) float64 dots of rows x[i], x[j]: the canonical edge value near the threshold."""
    return _dot64(x[i].astype(np.float64), x[j].astype(np.float64))


def centroid_distance(x: np.ndarray, c: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """(n,) Euclidean distance of each row of x[rows] (all of x when rows is None) to
    centroid c, from that row alone (no |x|^2 - 2x.c + |c|^2 expansion), so bit-identical
    rows tie exactly."""
    c64 = c.astype(np.float64)
    n = len(x) if rows is None else len(rows)
    out = np.empty(n)
    for o, r in _chunks(n, rows):
        diff = x[r].astype(np.float64) - c64
        out[o] = np.sqrt(_dot64(diff, diff))
    return out


def centroid_cosine(x: np.ndarray, c: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """(n,) float32 cosine between each row of x[rows] and the L2-normalised centroid."""
    c64 = c.astype(np.float64)
    chat = c64 / np.linalg.norm(c64)
    return row_dots(x, chat, rows)


def clip_and_cosine(x: np.ndarray, t: np.ndarray, c: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`row_dots(x, t, rows)`, `centroid_cosine(x, c, rows)`), the same bits, with each
    chunk of x[rows] converted to float64 once for both (the conversion is most of the work)."""
    chat = c.astype(np.float64) / np.linalg.norm(c.astype(np.float64))
    clip, cos = np.empty(len(rows), np.float32), np.empty(len(rows), np.float32)
    for o, r in _chunks(len(rows), rows):
        a = x[r].astype(np.float64)
        clip[o] = _dot64(a, t[o].astype(np.float64))
        cos[o] = _dot64(a, chat)
    return clip, cos


_HASH_MULT = (np.random.default_rng(0x5EED).integers(0, 2**63, size=4096, dtype=np.uint64) * 2 + 1)


def _row_hashes(words: np.ndarray) -> np.ndarray:
    """(n,) uint64 hash of each row of (n, m) uint64 words: sum of word * odd constant,
    modulo 2^64. Identical rows hash alike; collisions are checked by the caller."""
    mult = _HASH_MULT[np.arange(words.shape[1]) % len(_HASH_MULT)]
    out = np.empty(len(words), np.uint64)
    for s in range(0, len(words), _ROWS):
        out[s:s + _ROWS] = (words[s:s + _ROWS] * mult).sum(axis=1, dtype=np.uint64)
    return out


def collapse_identical(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit-identical rows -> (first: (u,) index of each distinct row's first occurrence,
    inverse: (n,) position of each row in `first`).

    Rows are grouped by a 64-bit hash of their bytes (sorting 3 KB rows bytewise is ~10x
    slower), then every row is compared bytewise with its group's first row; a hash
    collision (never seen in practice) falls back to the bytewise sort."""
    x = np.ascontiguousarray(x)
    row_bytes = x.dtype.itemsize * x.shape[1]
    if len(x) and row_bytes % 8 == 0:
        words = x.view(np.uint64).reshape(len(x), -1)
        _, first, inverse = np.unique(_row_hashes(words), return_index=True, return_inverse=True)
        inverse = inverse.ravel()
        rep = first[inverse]
        dup = np.flatnonzero(rep != np.arange(len(x)))
        if np.array_equal(words[dup], words[rep[dup]]):
            return _in_input_order(first, inverse)
    v = x.view(np.dtype((np.void, row_bytes))).ravel()
    _, first, inverse = np.unique(v, return_index=True, return_inverse=True)
    return _in_input_order(first, inverse.ravel())


def _in_input_order(first: np.ndarray, inverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _decide(x: np.ndarray, ii: np.ndarray, jj: np.ndarray, v: np.ndarray, threshold: float):
    """Keep the candidate pairs (ii, jj) whose dot is > threshold, given float32 values `v`
    within REFINE of the true dot: values farther than REFINE decide alone, the rest are
    decided by `pair_dots` (the canonical value, computed from the two rows alone)."""
    near = np.abs(v - threshold) <= REFINE
    ok = v > threshold
    if near.any():
        ok[near] = pair_dots(x, ii[near], jj[near]) > threshold
    return ii[ok], jj[ok]


# Tile of the similarity products: 512 rows x 2048 columns of float32 is 4 MB, about one
# core's L2 cache, so the thresholding pass reads the tile from cache.
TILE_ROWS, TILE_COLS_PER_ROW = 512, 4


def _tiles(n: int, rows: int):
    """(a, b, c, e): rows [a, b) against columns [c, e), covering the upper triangle of an
    (n, n) matrix. Column tiles are `TILE_COLS_PER_ROW` times as wide as row tiles, so the
    first column tile of a row band (c == a) holds its whole diagonal square."""
    cols = TILE_COLS_PER_ROW * rows
    for a in range(0, n, rows):
        b = min(a + rows, n)
        for c in range(a, n, cols):
            yield a, b, c, min(c + cols, n)


def _above(s: np.ndarray, cut: float):
    """(rows, cols) of the entries of 2-d `s` greater than `cut` (np.nonzero on a 2-d mask
    is ~10x slower than on a flat one)."""
    return np.divmod(np.flatnonzero(s > cut), s.shape[1])


def _upper(s: np.ndarray, a: int, b: int) -> np.ndarray:
    """Blank the diagonal and below of tile rows [a, b) x columns [a, ...)."""
    diag = s[:, : b - a]
    diag[np.tri(b - a, dtype=bool)] = -np.inf
    return s


def dense_edges(x: np.ndarray, threshold: float, block: int = 0):
    """Yield (i, j) arrays, i < j, of the pairs of rows of x (float32, (n, d)) whose dot
    is strictly greater than `threshold`: every product of the upper triangle, tile by
    tile (memory: one tile of `block` rows)."""
    n = len(x)
    if not block and n <= 4096:  # one symmetric product (BLAS syrk computes half of it)
        s = _upper(x @ x.T, 0, n)
        ii, jj = _above(s, threshold - REFINE)
        yield _decide(x, ii, jj, s[ii, jj], threshold)
        return
    for a, b, c, e in _tiles(n, block or TILE_ROWS):
        s = x[a:b] @ x[c:e].T
        if c == a:
            _upper(s, a, b)
        ii, jj = _above(s, threshold - REFINE)  # candidates: one pass over the tile
        yield _decide(x, ii + a, jj + c, s[ii, jj], threshold)


def decide_candidates(x: np.ndarray, ii: np.ndarray, jj: np.ndarray, threshold: float):
    """The candidate pairs (ii, jj) that are edges: float32 dots (error < REFINE for unit
    rows), then `_decide`."""
    v = np.empty(len(ii), np.float32)
    for q in range(0, len(ii), 1024):
        v[q:q + 1024] = np.einsum("ij,ij->i", x[ii[q:q + 1024]], x[jj[q:q + 1024]])
    return _decide(x, ii, jj, v, threshold)


class Candidates:
    """Candidate pairs gathered over tiles and decided together (`decide_candidates`) once
    at least BATCH are held, or at the end. Per tile they are few (~35 on a 20k-row
    cluster): deciding and merging them tile by tile made ~10 small numpy calls per tile,
    each a GIL release and take-back, which can wait for another thread (step 1 in threads:
    `--no-fork`, `--device cuda`)."""

    BATCH = 1 << 15

    def __init__(self, x: np.ndarray, threshold: float):
        self.x, self.threshold = x, threshold
        self.ii: list = []
        self.jj: list = []
        self.held = 0

    def add(self, ii: np.ndarray, jj: np.ndarray):
        """Hold the pairs; the edges among everything held when BATCH is reached, else None."""
        self.ii.append(ii)
        self.jj.append(jj)
        self.held += len(ii)
        return self.flush() if self.held >= self.BATCH else None

    def flush(self):
        """The edges among the pairs held (None when there are none); holds nothing after."""
        if not self.held:
            return None
        ii, jj = np.concatenate(self.ii), np.concatenate(self.jj)
        self.ii, self.jj, self.held = [], [], 0
        return decide_candidates(self.x, ii, jj, self.threshold)


PRODUCTS = ("int8", "float32")


def similarity_edges(x: np.ndarray, threshold: float, block: int = 0, products: str = "int8", threads: int = 1):
    """Yield (i, j) arrays, i < j, of the pairs of rows of x (float32, (n, d)) whose dot
    is strictly greater than `threshold`; exact (see `_decide`). Large clusters use the
    pruning bound when it pays off (`bound.py`; with int8 products, `int8.py`, unless
    `products` is "float32"; `threads` per int8 product), small ones the full upper
    triangle. The edges never depend on these choices."""
    from bunny.select import bound

    if products == "int8":
        from bunny.select import int8

        plan = int8.plan(x, threshold)
        if plan is not None:
            yield from int8.edges(x, threshold, plan, block, threads)
            return
    elif products == "float32":
        plan = bound.bound_plan(x, threshold)
    else:
        raise ValueError(f"products={products!r}: choose one of {', '.join(PRODUCTS)}")
    if plan is None:
        yield from dense_edges(x, threshold, block)
    else:
        yield from bound.bounded_edges(x, threshold, plan, block)


def components(x: np.ndarray, threshold: float, block: int = 0, edges=None) -> np.ndarray:
    """(n,) component label (smallest member index) of the graph joining rows of x whose
    dot exceeds `threshold`. Bit-identical rows are collapsed first: they are one node
    when their self-dot exceeds the threshold (always, for unit rows and threshold < 1).
    `edges(u, threshold)` finds the pairs of distinct rows (default `similarity_edges`)."""
    first, inverse = collapse_identical(x)
    return distinct_components(Distinct(x[first], first, inverse), threshold, block, edges)


@dataclass(frozen=True)
class Distinct:
    """Rows given as their distinct values: row i of the original array is u[inverse[i]],
    first[k] is the original index of u[k]'s first occurrence (`collapse_identical`).
    The step-1 kernel builds it from the stored rows before converting them, so a
    cluster's rows are converted to float32 (and copied) once, distinct rows only."""
    u: np.ndarray
    first: np.ndarray
    inverse: np.ndarray


def distinct_components(d: Distinct, threshold: float, block: int = 0, edges=None) -> np.ndarray:
    """`components` of the rows that `d` stands for."""
    u, first, inverse = d.u, d.first, d.inverse
    parent = np.arange(len(u))
    for i, j in (edges or (lambda v, t: similarity_edges(v, t, block)))(u, threshold):
        parent = union_edges(parent, i, j)
    label_u = first[parent]  # root's original index
    labels = label_u[inverse]
    # duplicates whose self-dot is not above the threshold are their own components
    copies = np.flatnonzero(np.bincount(inverse, minlength=len(u)) > 1)
    if len(copies):
        self_ok = np.ones(len(u), dtype=bool)
        self_ok[copies] = pair_dots(u, copies, copies) > threshold
        lone = ~self_ok[inverse] & (np.arange(len(inverse)) != first[inverse])
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
                  block: int = 0, edges=None) -> np.ndarray:
    """(n,) bool, SemDeDup's rule: rank rows by distance to the centroid descending (the
    paper's keep-hard order; ties by gid), drop a row when any earlier-ranked row (kept or
    not) has cosine > 1 - eps with it."""
    first, inverse = collapse_identical(x)
    return distinct_semdedup(Distinct(x[first], first, inverse), dist, gid, eps, block, edges)


def distinct_semdedup(d: Distinct, dist: np.ndarray, gid: np.ndarray, eps: float,
                      block: int = 0, edges=None) -> np.ndarray:
    """`keep_semdedup` of the rows that `d` stands for."""
    u, inverse = d.u, d.inverse
    n = len(inverse)
    if not n:
        return np.zeros(0, dtype=bool)
    rank_order = np.lexsort((gid, -dist))
    rank = np.empty(n, dtype=np.int64)
    rank[rank_order] = np.arange(n)
    drop = np.zeros(n, dtype=bool)
    # identical copies: every copy but the earliest-ranked has an earlier identical row
    self_ok = pair_dots(u, np.arange(len(u)), np.arange(len(u))) > 1 - eps
    best = np.full(len(u), np.iinfo(np.int64).max)
    np.minimum.at(best, inverse, rank)
    drop |= self_ok[inverse] & (rank != best[inverse])
    # distinct rows: an edge drops the later-ranked side; for a row standing for several
    # copies, its earliest copy is the one compared (later copies are dropped above)
    for i, j in (edges or (lambda v, t: similarity_edges(v, t, block)))(u, 1 - eps):
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
