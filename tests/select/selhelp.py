"""Shared helpers: write a LAION-layout folder, clusters of the benchmark's kinds, and the
reference path (`bunny.select.reference`) to compare the engines against."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def write_layout(root: Path, img_shards, txt_shards, keys=None, dtype=np.float16):
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    gid = 0
    for s, (x, t) in enumerate(zip(img_shards, txt_shards)):
        np.save(root / f"img_emb/img_emb_{s:04d}.npy", np.asarray(x, dtype))
        np.save(root / f"text_emb/text_emb_{s:04d}.npy", np.asarray(t, dtype))
        k = keys[s] if keys else [f"key{gid + i}" for i in range(len(x))]
        pq.write_table(pa.table({"key": k, "caption": [f"c{i}" for i in range(len(k))]}),
                       root / f"metadata/metadata_{s:04d}.parquet")
        gid += len(x)
    return root


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def edge_set(gen):
    """{(i, j)} of an edge generator's (i, j) arrays."""
    return {(int(i), int(j)) for a, b in gen for i, j in zip(a, b)}


def cluster_like(rng, n, d, spread=0.6):
    """A cluster: mean direction plus noise with a decaying spectrum, 30% near-duplicates
    (some bit-identical), float16 as stored."""
    scale = 1.0 / np.sqrt(np.arange(1, d + 1))
    base = np.eye(d)[0] * 1.0 + spread * rng.normal(size=(n, d)) * scale / np.linalg.norm(scale)
    src, dst = rng.integers(n, size=n // 3), rng.choice(n, n // 3, replace=False)
    base[dst] = base[src] + 0.1 * rng.normal(size=(n // 3, d)) / np.sqrt(d)
    x = unit(base).astype(np.float16).astype(np.float32)
    x[dst[:20]] = x[src[:20]]
    return x


def isotropic_cluster(seed=8, n=2500, d=128):
    """The benchmark's kind of cluster: isotropic noise around a centre, near-duplicates."""
    rng = np.random.default_rng(seed)
    y = np.eye(d)[0] + rng.normal(size=(n, d)) / np.sqrt(d)
    src, dst = rng.integers(n, size=n * 6 // 25), rng.choice(n, n * 6 // 25, replace=False)
    y[dst] = y[src] + 0.25 * rng.normal(size=(len(dst), d)) / np.sqrt(d)
    return unit(y).astype(np.float16).astype(np.float32)


def spectral_cluster(a, n, d, seed=8):
    """The benchmark's `--spectrum a` kind of cluster: noise with variance ~ i**-a along the
    directions of a random basis (a = 0: isotropic) around a centre, near-duplicates."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, d + 1) ** (-a / 2)
    scale *= np.sqrt(d / np.sum(scale ** 2))
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    y = np.eye(d)[0] + (rng.normal(size=(n, d)) * scale) @ basis.T / np.sqrt(d)
    src, dst = rng.integers(n, size=n * 6 // 25), rng.choice(n, n * 6 // 25, replace=False)
    y[dst] = y[src] + 0.25 * rng.normal(size=(len(dst), d)) / np.sqrt(d)
    return unit(y).astype(np.float16).astype(np.float32)


def assert_exact_at_every_rank(edges_at_rank, ranks=(4, 24, 96)):
    """`edges_at_rank(x, threshold, r)` (a pruned kernel with its plan forced to rank r) gives
    the full product's edges: any rank gives a valid bound (a small one prunes little), and
    thresholds placed on actual pair values check the decision at the boundary."""
    from bunny.select import rules

    x = cluster_like(np.random.default_rng(7), 1000, 96)
    n = len(x)
    sim = x.astype(np.float64) @ x.astype(np.float64).T
    near = float(np.sort(sim[np.triu_indices(n, 1)])[-2000])
    for thr in (0.86, near, float(np.nextafter(near, 2))):
        want = edge_set(rules.dense_edges(x, thr, block=128))
        for rank in ranks:
            assert edge_set(edges_at_rank(x, thr, rank)) == want, (thr, rank)


def synthetic(rng, n, d, groups=4, dup_frac=0.3):
    """Rows around `groups` directions, with near-duplicates and exact duplicates."""
    centers = unit(rng.normal(size=(groups, d)))
    x = centers[rng.integers(groups, size=n)] + 0.45 * rng.normal(size=(n, d)) / np.sqrt(d) * 4
    nd = int(dup_frac * n)
    src = rng.integers(n, size=nd)
    dst = rng.choice(n, size=nd, replace=False)
    x[dst] = x[src] + 0.05 * rng.normal(size=(nd, d)) / np.sqrt(d) * 4
    x = unit(x)
    x[dst[: nd // 3]] = x[src[: nd // 3]]  # some bit-identical rows
    t = unit(x + 0.8 * rng.normal(size=(n, d)) / np.sqrt(d) * 4)
    return x, t


@pytest.fixture
def make_input(tmp_path):
    def make(shard_sizes=(120, 80, 100), d=16, seed=0, groups=4):
        rng = np.random.default_rng(seed)
        n = sum(shard_sizes)
        x, t = synthetic(rng, n, d, groups)
        cuts = np.cumsum(shard_sizes)[:-1]
        return write_layout(tmp_path / "in", np.split(x, cuts), np.split(t, cuts))
    return make


def oracle(root: Path, centroids, threshold=0.86, clip=(0.4, 0.6), cent=(0.15, 0.35), n=None, seed=0):
    """The spec, straightforwardly (`bunny.select.reference`): all rows in memory, dense
    products, union-find, full sorts."""
    from bunny.select import reference

    return reference.select(root, centroids, threshold, clip, cent, n, seed)
