"""The fast path against the reference path (`bunny.select.reference`: dense products,
union-find, full sorts): identical ids at every stage on seeded inputs whose clusters go
through the pruned products (int8 and float32), in worker processes and in threads."""
import numpy as np
import pytest

from bunny.select import bound, int8, reference, rules
from bunny.select.engine import SelectConfig, select
from selhelp import edge_set, spectral_cluster, unit, write_layout
from test_engine import FILES, tables


def _input(tmp_path, seed: int, d: int = 64):
    """Three clusters of the benchmark's kinds (isotropic, variance ~ 1/i, ~ 1/i^2), each
    turned by its own rotation, over three shards in shuffled order."""
    rng = np.random.default_rng(seed)
    parts, cents = [], []
    for a, n in ((0.0, 700), (1.0, 600), (2.0, 500)):
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        x = spectral_cluster(a, n, d, seed=seed * 10 + int(a)) @ q.T
        parts.append(x)
        cents.append(unit(x.mean(axis=0)))
    x = np.concatenate(parts)[rng.permutation(1800)].astype(np.float32)
    t = unit(x + 2.5 * rng.standard_normal(x.shape) / np.sqrt(d))
    cuts = [500, 1100]
    inp = write_layout(tmp_path / "in", np.split(x, cuts), np.split(t, cuts))
    np.save(tmp_path / "c.npy", np.asarray(cents, np.float32))
    return inp, np.asarray(cents, np.float32)


@pytest.mark.parametrize("seed,products,fork", [(0, "int8", True), (1, "int8", False), (2, "float32", True),
                                                (3, "float32", False)])
def test_engine_equals_reference(tmp_path, monkeypatch, seed, products, fork):
    plan, bound_plan = int8.plan, bound.bound_plan
    used = []  # forced through the pruned products at a small rank (the planner would pick the full product)
    monkeypatch.setattr(int8, "plan", lambda x, t, rank=None: used.append(1) or plan(x, t, rank=16))
    monkeypatch.setattr(bound, "bound_plan", lambda x, t, rank=None: used.append(1) or bound_plan(x, t, rank=16))
    inp, c = _input(tmp_path, seed)
    thr = (0.86, 0.7, 0.8, 0.75)[seed]
    rep = select(SelectConfig(input=str(inp), out=str(tmp_path / "o"), centroids=str(tmp_path / "c.npy"),
                              threshold=thr, n=100, seed=seed, products=products, fork=fork, workers=2,
                              progress=False))
    want = reference.select(inp, c, threshold=thr, n=100, seed=seed)
    got = tables(tmp_path / "o")
    for name, f in zip(("selected", "dedup", "clip", "centroid"), FILES):
        assert got[f]["gid"].tolist() == want[name].tolist(), name
    assert (got["selected.parquet"]["cluster"].values == want["cluster"][want["selected"]]).all()
    assert np.bincount(want["cluster"], minlength=3).tolist() == np.load(tmp_path / "o/cluster_sizes.npy").tolist()
    assert 0 < rep["rows_after"]["dedup"] < 1800  # components of several rows were merged
    if not fork:
        assert len(used) == 3  # every cluster went through the pruned products


def test_reference_edges_and_components_equal_the_tiled_kernel():
    rng = np.random.default_rng(5)
    x = spectral_cluster(1.0, 900, 48, seed=5)
    i, j = reference.edges(x, 0.86)
    assert set(zip(i.tolist(), j.tolist())) == edge_set(rules.dense_edges(x, 0.86, block=128))
    for _ in range(5):  # random graphs: union-find against the array union-find of the engines
        n = 200
        a, b = rng.integers(n, size=150), rng.integers(n, size=150)
        keep = a != b
        i, j = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
        assert np.array_equal(reference.components(n, i, j), rules.union_edges(np.arange(n), i, j))
