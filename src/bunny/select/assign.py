"""Step 0: centroids (from a file or seeded faiss k-means) and exact nearest-centroid
assignment.

faiss computes L2 distances by expansion (|x|^2 - 2x.c + |c|^2), whose rounding depends
on the block a row sits in. It is used only to propose the two nearest centroids; rows
whose two proposals are within `GAP` are decided again from the row alone
(float64 sum of squared differences), ties to the lower centroid index. The result
depends only on the row, never on the block size or the worker.
"""
from __future__ import annotations

import numpy as np

from bunny.errors import BunnyError
from bunny.select.layout import Layout

GAP = 1e-3  # far above faiss's float32 rounding for unit vectors


def load_centroids(path, dim: int) -> np.ndarray:
    c = np.load(path)
    if c.ndim != 2 or c.shape[1] != dim:
        raise BunnyError(f"centroids {path}: shape {c.shape}, expected (k, {dim}) to match the embeddings")
    if not np.isfinite(c).all():
        row = int(np.flatnonzero(~np.isfinite(c).all(axis=1))[0])
        raise BunnyError(f"centroids {path}: row {row} has NaN or infinite values")
    return np.ascontiguousarray(c, dtype=np.float32)


def sample_rows(layout: Layout, size: int, seed: int) -> np.ndarray:
    """(size, d) float32 image rows at seeded random gids, read shard by shard."""
    rng = np.random.default_rng(seed)
    size = min(size, layout.rows)
    gids = np.sort(rng.choice(layout.rows, size=size, replace=False))
    offs = layout.offsets()
    parts = []
    for s in layout.shards:
        sel = gids[(gids >= offs[s.index]) & (gids < offs[s.index + 1])] - s.offset
        if len(sel):
            parts.append(layout.rows_f32(layout.img(s.index), sel))
    return np.concatenate(parts)


def fit_kmeans(layout: Layout, k: int, seed: int, sample: int = 0, niter: int = 20) -> np.ndarray:
    """(k, d) float32 L2 k-means centroids fitted by faiss on a seeded sample
    (default 256 rows per centroid, as faiss recommends)."""
    import faiss

    if k < 1 or k > layout.rows:
        raise BunnyError(f"--k {k}: must be between 1 and the number of rows ({layout.rows})")
    x = sample_rows(layout, sample or 256 * k, seed)
    km = faiss.Kmeans(layout.dim, k, niter=niter, seed=seed, verbose=False, max_points_per_centroid=1 << 30)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def exact_sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(n, k) squared L2 distances computed per (row, centroid) from the two vectors alone
    (float64 differences, then numpy's pairwise sum along d): no expansion, so the value
    does not depend on the other rows. Rows go in chunks of at most ~32M differences."""
    out = np.empty((len(x), len(c)))
    c64 = c.astype(np.float64)
    step = max(1, (1 << 25) // max(1, c.size))
    for a in range(0, len(x), step):
        d = x[a:a + step].astype(np.float64)[:, None, :] - c64[None, :, :]
        out[a:a + step] = (d * d).sum(axis=2)
    return out


def refine(x: np.ndarray, c: np.ndarray, best: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """Rows whose two nearest proposals are within GAP are decided again by
    `exact_sq_dist`; argmin returns the first (lowest) index among exact ties. Shared by
    every assigner, so the labels never depend on the one used."""
    close = np.flatnonzero(gap <= GAP)
    if len(close):
        best[close] = exact_sq_dist(x[close], c).argmin(axis=1)
    return best


class _NumpyIndex:
    """faiss.IndexFlatL2's search (two nearest, float32 expansion) in numpy, for machines
    without faiss; `refine` makes the labels identical whichever index proposed them."""

    def __init__(self, centroids: np.ndarray):
        self.c = np.ascontiguousarray(centroids, dtype=np.float32)
        self.cn = np.einsum("ij,ij->i", self.c, self.c)

    def search(self, x: np.ndarray, kk: int):
        d2 = self.cn[None, :] - 2.0 * (x @ self.c.T) + np.einsum("ij,ij->i", x, x)[:, None]
        idx = np.argpartition(d2, kk - 1, axis=1)[:, :kk] if kk < d2.shape[1] else np.argsort(d2, axis=1)
        dist = np.take_along_axis(d2, idx, axis=1)
        o = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, o, axis=1), np.take_along_axis(idx, o, axis=1)


class Assigner:
    """Nearest centroid of each row; holds a faiss flat index over the centroids (or its
    numpy equivalent when faiss is not installed: same labels). `threads` > 0 sets the
    OpenMP threads of faiss's search for the calling thread only (OpenMP's thread count is
    per thread: a process-wide limit set elsewhere does not reach worker threads)."""

    def __init__(self, centroids: np.ndarray, threads: int = 0):
        self.c = centroids
        self.threads = threads
        self.faiss = None
        try:
            import faiss
        except ImportError:
            self.index = _NumpyIndex(centroids)
        else:
            self.faiss = faiss
            self.index = faiss.IndexFlatL2(centroids.shape[1])
            self.index.add(centroids)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n,) int32 cluster of each float32 row."""
        kk = min(2, len(self.c))
        if self.faiss is not None and self.threads > 0:
            self.faiss.omp_set_num_threads(self.threads)
        dist, idx = self.index.search(np.ascontiguousarray(x, dtype=np.float32), kk)
        best = idx[:, 0].astype(np.int32)
        if kk > 1:
            best = refine(x, self.c, best, dist[:, 1] - dist[:, 0])
        return best
