"""int8 products for step 1 (int8.py, ort_ops.py): the kernels are exact, and the edges
found through the quantised bound are exactly the full float product's edges."""
import numpy as np
import pytest

from bunny.select import bound, int8, ort_ops, processes, rules
from bunny.select.engine import SelectConfig, select
from selhelp import assert_exact_at_every_rank, cluster_like, edge_set, isotropic_cluster, spectral_cluster


def test_int8_product_is_exact_on_extreme_values():
    rng = np.random.default_rng(0)
    q = ort_ops.qmax()
    assert q in (127, 63)
    a = rng.integers(-q, q + 1, size=(37, 200)).astype(np.int8)
    b = rng.integers(-q, q + 1, size=(200, 23)).astype(np.int8)
    a[0], b[:, 0] = q, q  # the largest sums, where a saturating kernel would go wrong
    a[1], b[:, 1] = -q, -q
    u = a.view(np.uint8) ^ np.uint8(0x80)  # int8 + 128, as the kernel takes it
    got = ort_ops.product(np.ascontiguousarray(u), b)
    assert got.dtype == np.int32
    assert np.array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


def test_float16_cast_is_bit_exact_for_every_value():
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(32, 2048)
    got, want = ort_ops.to_float32(h), h.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    x = np.ones((3, 5), np.float32)  # float32 input is copied as it is
    assert np.array_equal(ort_ops.to_float32(x), x)


def test_shipped_onnx_models_are_the_ones_onnx_builds():
    """The model files ort_ops runs are exactly `onnx_models.build`'s models (made with the
    onnx package's helper API) and pass onnx's checker."""
    import onnx

    from bunny.select import onnx_models

    for kind in onnx_models.KINDS:
        shipped = onnx.load(onnx_models.path(kind))
        onnx.checker.check_model(shipped, full_check=True)
        assert shipped == onnx_models.build(kind), kind


def test_without_onnxruntime_casts_use_numpy_and_int8_products_say_what_is_missing(monkeypatch):
    import sys

    from bunny.errors import BunnyError

    monkeypatch.setattr(ort_ops, "_SESSIONS", {})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    h = np.random.default_rng(2).normal(size=(7, 9)).astype(np.float16)
    assert np.array_equal(ort_ops.to_float32(h), h.astype(np.float32))
    with pytest.raises(BunnyError, match="onnxruntime.*--products float32"):
        ort_ops.product(np.zeros((2, 8), np.uint8), np.zeros((8, 2), np.int8))


def test_digits_represent_every_value():
    rng = np.random.default_rng(1)
    v = np.r_[rng.integers(-10**7, 10**7, size=500), 0, 1, -1, 63, -64, 127, 128, -16129, 16129, 10**7]
    for base in (127, 63):
        d = int8._digits(v, base)
        assert np.abs(d.astype(np.int64)).max() <= base
        assert np.array_equal(d.astype(np.int64) @ int8._weights(d.shape[1], base).astype(np.int64), v)


@pytest.mark.parametrize("qmax", [127, 63])
def test_quantisation_errors_are_upper_bounds(qmax):
    """The float32 quantisation's per-row error and magnitude bound the exact ones (computed
    in float64 from the same float32 z, the float32 scale and the integers: all exact)."""
    rng = np.random.default_rng(5)
    n, r = 3000, 300
    z = (rng.normal(size=(n, r)) * rng.uniform(0.01, 0.2, size=r)).astype(np.float32)
    z[0] = 0.2  # a row at the largest magnitude: its q sits at +-qmax
    delta = rng.normal(scale=0.05, size=n)
    s = max(float(np.abs(z).max()), float(np.abs(delta).max())) / qmax
    s = float(np.nextafter(np.float32(s), np.float32(np.inf)))
    q = np.empty((n, r + 1), np.int8)
    err, big = int8._quantise_rows(z, delta, s, qmax, q, chunk=256)
    assert np.abs(q).max() == qmax
    w = np.concatenate([z.astype(np.float64), delta[:, None]], axis=1)
    e = w - s * q.astype(np.float64)
    exact_err = np.sqrt((e * e).sum(axis=1))
    exact_big = np.maximum(np.sqrt((w * w).sum(axis=1)), s * np.sqrt((q.astype(np.float64) ** 2).sum(axis=1)))
    assert (err >= exact_err).all() and (big >= exact_big).all()
    assert (err <= exact_err * (1 + 1e-3) + 1e-9).all() and (big <= exact_big * (1 + 1e-3)).all()  # and tight


def test_int8_edges_equal_the_full_product(monkeypatch):
    """The narrow int8 range (63, exact on every CPU) and this CPU's own range (127 where the
    kernel does not saturate: VNNI) are exact at every rank."""
    for qmax in sorted({63, ort_ops.qmax()}):
        monkeypatch.setattr(ort_ops, "qmax", lambda q=qmax: q)
        assert_exact_at_every_rank(lambda x, t, r: int8.edges(x, t, int8.plan(x, t, rank=r), block=128))


def test_plans_on_the_benchmark_kind_of_cluster(monkeypatch):
    """Isotropic noise around a centre with near-duplicates: the int8 plan picks a rank below
    d (the float32 plan may find the full product cheaper at this size) and the edges and
    components are the full product's."""
    x = isotropic_cluster()
    d = x.shape[1]
    monkeypatch.setattr(bound, "BOUND_MIN_ROWS", 100)
    plan = int8.plan(x, 0.86)
    assert plan is not None and plan.r < d
    u = x[rules.collapse_identical(x)[0]]
    want = edge_set(rules.dense_edges(u, 0.86))
    assert edge_set(rules.similarity_edges(u, 0.86)) == want
    assert edge_set(rules.similarity_edges(u, 0.86, products="float32")) == want
    assert np.array_equal(rules.components(x, 0.86), rules.components(x, 0.86, edges=rules.dense_edges))


def test_int8_falls_back_to_the_float_bound_when_integers_would_overflow(monkeypatch):
    x = cluster_like(np.random.default_rng(9), 600, 64)
    p = int8.plan(x, 0.86, rank=16)
    assert int8.quantise(x, 0.86, p) is not None
    monkeypatch.setattr(int8, "_INT32_SAFE", 4)
    assert int8.quantise(x, 0.86, p) is None
    assert edge_set(int8.edges(x, 0.86, p, block=64)) == edge_set(rules.dense_edges(x, 0.86, block=64))


def test_unknown_products_are_refused(make_input, tmp_path):
    from bunny.errors import BunnyError

    with pytest.raises(ValueError, match="products"):
        list(rules.similarity_edges(np.eye(3, dtype=np.float32), 0.5, products="int4"))
    with pytest.raises(BunnyError, match="--products"):
        select(SelectConfig(input=str(make_input()), out=str(tmp_path / "o"), k=3, products="int4", progress=False))


def test_select_with_float32_products_is_identical(make_input, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    # the pruned paths on every cluster of this small input (where the planner would take the
    # full product): plans forced to rank 16
    plan, bound_plan = int8.plan, bound.bound_plan
    monkeypatch.setattr(int8, "plan", lambda x, t, rank=None: plan(x, t, rank=16))
    monkeypatch.setattr(bound, "bound_plan", lambda x, t, rank=None: bound_plan(x, t, rank=16))
    runs = []
    edges = int8.edges
    monkeypatch.setattr(int8, "edges", lambda *a, **k: runs.append(1) or edges(*a, **k))
    monkeypatch.setattr(processes, "available", lambda: False)  # `runs` counts in this process: threads
    inp = make_input(shard_sizes=(330, 290, 310), d=64, seed=12)
    a = select(SelectConfig(input=str(inp), out=str(tmp_path / "a"), k=3, seed=1, n=40, progress=False))
    assert len(runs) == 3  # every cluster went through the int8 bound
    b = select(SelectConfig(input=str(inp), out=str(tmp_path / "b"), k=3, seed=1, n=40, products="float32",
                            progress=False))
    assert a["rows_after"] == b["rows_after"] and a["rows_after"]["dedup"] < a["rows_after"]["input"]
    for f in ("selected.parquet", "stages/dedup.parquet"):
        assert pq.read_table(tmp_path / "a" / f).equals(pq.read_table(tmp_path / "b" / f)), f


def test_a_misjudged_rank_grows_mid_cluster_and_stays_exact(monkeypatch):
    """When the tiles done so far leave too many candidates, the rest of the cluster uses
    more basis columns: tiles before and after the switch together give exactly the edges."""
    x = cluster_like(np.random.default_rng(10), 1200, 96)
    monkeypatch.setattr(int8, "_GROW_MIN_PAIRS", 1000)
    monkeypatch.setattr(int8, "GROW_FRAC", 1e-9)  # any candidate: grow while columns are left
    ranks = []
    quantise = int8.quantise
    monkeypatch.setattr(int8, "quantise", lambda x_, t, p, *a: ranks.append(p.r) or quantise(x_, t, p, *a))
    p = int8.plan(x, 0.86, rank=4)
    assert p.basis.shape[1] >= 72  # room to grow (3d/4 columns kept)
    got = edge_set(int8.edges(x, 0.86, p, block=64))
    assert got == edge_set(rules.dense_edges(x, 0.86, block=64))
    assert ranks == [4, 4 + int8.GROW_COLS, 72]


def _axes_plan(x, r):
    """An int8 plan on coordinate axes (largest variance first) forced to rank r."""
    d = x.shape[1]
    mu = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    order = np.argsort(-((x - mu) ** 2).sum(axis=0), kind="stable")[:max(r, 3 * d // 4)]
    basis = np.zeros((d, len(order)), np.float32)
    basis[order, np.arange(len(order))] = 1.0
    return int8.Int8Plan(mu, basis, r, 0.0, order)


def test_planner_uses_coordinate_axes_only_where_they_prune_as_well(monkeypatch):
    """On an isotropic cluster no direction prunes better than another, so the planner takes
    coordinate axes (no projection of the rows, an exactly orthonormal basis); on a steep
    spectrum it keeps the eigenbasis. Either way the edges are the full product's."""
    monkeypatch.setattr(bound, "BOUND_MIN_ROWS", 100)
    iso, steep = spectral_cluster(0.0, 4000, 256), spectral_cluster(1.0, 4000, 256)
    p, q = int8.plan(iso, 0.86), int8.plan(steep, 0.86)
    assert p.axes is not None and p.phi == 0.0 and p.r < 256
    assert np.count_nonzero(p.basis) == len(p.axes) and (p.basis[p.axes, np.arange(len(p.axes))] == 1).all()
    assert q.axes is None and q.r < 256
    for x, plan in ((iso, p), (steep, q)):
        u = x[rules.collapse_identical(x)[0]]
        assert edge_set(int8.edges(u, 0.86, plan)) == edge_set(rules.dense_edges(u, 0.86))


def test_axes_coordinates_are_the_identity_basis_product():
    """Gathering the axes' columns gives the same integers as multiplying by the identity
    columns (every coordinate is one exact product), grown plans included."""
    x = spectral_cluster(0.0, 1500, 64)
    p = _axes_plan(x, 24)
    same = int8.Int8Plan(p.mu, p.basis, p.r, p.phi)  # no axes: the basis product
    for a, b in ((p, same), (p.grown(), same.grown())):
        assert a.axes is not None and b.axes is None and a.r == b.r
        got, want = int8.quantise(x, 0.86, a), int8.quantise(x, 0.86, b)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_int8_edges_on_coordinate_axes_equal_the_full_product():
    assert_exact_at_every_rank(lambda x, t, r: int8.edges(x, t, _axes_plan(x, r), block=128))


def test_uncorrelated_coordinates_are_told_from_correlated_ones():
    """The correlation test behind skipping the eigenbasis: independent coordinates (any
    variances) pass, the benchmark's spectrum in a random basis does not."""
    rng = np.random.default_rng(3)
    n, d = 2000, 128
    indep = rng.normal(size=(n, d)) * rng.uniform(0.1, 2.0, size=d)  # very unequal variances
    laplace = rng.laplace(size=(n, d))  # not Gaussian: still independent
    for x in (indep, laplace):
        x = (x - x.mean(axis=0)).astype(np.float32)
        assert bound.uncorrelated(x.T @ x, n)
    steep = spectral_cluster(1.0, n, d)
    steep = steep - steep.mean(axis=0)
    assert not bound.uncorrelated(steep.T @ steep, n)
    # one direction, not along any axis, holding a tenth of the energy: the ratio sees
    # correlated structure by its share of the energy (about sqrt(1 / rows) is the limit)
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    total = float((indep ** 2).sum(axis=1).mean())
    one = indep + np.sqrt(total / 9) * rng.normal(size=(n, 1)) * v
    one = (one - one.mean(axis=0)).astype(np.float32)
    assert not bound.uncorrelated(one.T @ one, n)
    assert not bound.uncorrelated(np.zeros((d, d), np.float32), n)  # no variance: nothing to decide on


def test_planner_skips_the_eigenbasis_on_uncorrelated_coordinates(monkeypatch):
    """An isotropic cluster plans on the axes without computing any eigenbasis; a steep
    spectrum still computes it (and keeps it)."""
    monkeypatch.setattr(bound, "BOUND_MIN_ROWS", 100)
    calls = []
    eigh = bound.eigh_desc
    monkeypatch.setattr(bound, "eigh_desc", lambda *a: calls.append(1) or eigh(*a))
    p = int8.plan(spectral_cluster(0.0, 4000, 256), 0.86)
    assert p.axes is not None and calls == []
    q = int8.plan(spectral_cluster(1.0, 4000, 256), 0.86)
    assert q.axes is None and calls == [1]


def test_rotation_keeps_the_span_and_spreads_the_coordinates():
    """`bound.rotate_leading` (int8 plans) mixes the first r columns only: same span (same projector), orthonormal
    up to the measured defect, columns after r untouched; fixed per r. On a steep spectrum
    the largest coordinate drops and the same rank leaves fewer candidate pairs, with the
    same edges."""
    from dataclasses import replace

    rot = bound.rotation(40)
    assert np.allclose(rot.T @ rot, np.eye(40), atol=1e-12) and np.array_equal(rot, bound.rotation(40))
    x = spectral_cluster(1.0, 4000, 256)
    r = 64
    p = int8.plan(x, 0.86, rank=r)  # rotated by plan
    plain = bound.plan_rank(x, 0.86, centre=True, rank=r, keep=192)
    a, b = p.basis[:, :r].astype(np.float64), plain.basis[:, :r].astype(np.float64)
    assert np.abs(a @ a.T - b @ b.T).max() < 1e-5
    assert np.array_equal(p.basis[:, r:], plain.basis[:, r:])
    assert 0 < p.phi < 1e-4 and p.phi >= np.linalg.norm(p.basis.T.astype(np.float64) @ p.basis - np.eye(192), 2)
    unrotated = replace(p, basis=plain.basis, phi=plain.phi)
    u = x[rules.collapse_identical(x)[0]]
    z_rot, z_eig = int8._rows(u, p)[0], int8._rows(u, unrotated)[0]
    assert np.abs(z_rot).max() < 0.6 * np.abs(z_eig).max()

    def count(plan):
        got = []
        decide = rules.decide_candidates
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(int8, "GROW_FRAC", 1.0)  # no growing: compare the two ranks as they are
            mp.setattr(rules, "decide_candidates", lambda y, i, j, t: got.append(len(i)) or decide(y, i, j, t))
            edges = edge_set(int8.edges(u, 0.86, plan))
        return edges, sum(got)

    (e_rot, n_rot), (e_eig, n_eig) = count(p), count(unrotated)
    assert e_rot == e_eig == edge_set(rules.dense_edges(u, 0.86))
    assert n_rot < 0.5 * n_eig
