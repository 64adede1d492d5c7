"""The float32 eigenbasis of the pruning bound and the slack for its orthonormality defect."""
import numpy as np
import pytest

from bunny.select import lapack, rules
from selhelp import assert_exact_at_every_rank, edge_set, isotropic_cluster


def _moments(rng, d=96):
    a = rng.normal(size=(400, d)) * np.linspace(3, 0.1, d)
    return (a.T @ a).astype(np.float32)


def test_eigh_desc_matches_numpy_float64():
    g = _moments(np.random.default_rng(0))
    v = lapack.eigh_desc(g)
    w64, v64 = np.linalg.eigh(g.astype(np.float64))
    w64, v64 = w64[::-1], v64[:, ::-1]
    assert v.dtype == np.float32 and v.shape == g.shape
    rayleigh = np.einsum("ij,ij->j", v.astype(np.float64), g.astype(np.float64) @ v.astype(np.float64))
    np.testing.assert_allclose(rayleigh, w64, rtol=1e-4, atol=1e-3 * w64[0])  # largest first
    gap = np.abs(np.diff(w64))
    separated = np.flatnonzero((np.r_[np.inf, gap] > 1e-2 * w64[0]) & (np.r_[gap, np.inf] > 1e-2 * w64[0]))
    cos = np.abs(np.einsum("ij,ij->j", v[:, separated].astype(np.float64), v64[:, separated]))
    assert len(separated) > 5 and cos.min() > 1 - 1e-4  # same vectors up to sign


def test_numpy_fallback_gives_the_same_kind_of_basis(monkeypatch):
    g = _moments(np.random.default_rng(1))
    fast = lapack.eigh_desc(g)
    monkeypatch.setattr(lapack, "_FN", [None])
    assert lapack.backend() == "numpy-eigh-float64"
    slow = lapack.eigh_desc(g)
    assert slow.dtype == np.float32 and lapack.orthonormality_defect(slow) < 1e-5
    assert np.abs(np.einsum("ij,ij->j", fast[:, :5], slow[:, :5])).min() > 1 - 1e-4


def test_defect_bounds_the_spectral_norm():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(64, 40)))
    for eps in (0.0, 1e-6, 1e-3):
        v = (q + eps * rng.normal(size=q.shape)).astype(np.float32)
        v64 = v.astype(np.float64)
        true = np.linalg.norm(v64.T @ v64 - np.eye(40), 2)
        phi = lapack.orthonormality_defect(v)
        assert true <= phi <= 40 * true + 1e-9
    assert lapack.orthonormality_defect(lapack.eigh_desc(_moments(rng))) < 1e-4


def test_skewed_basis_needs_its_defect_in_the_slack():
    """Two columns of an orthonormal pair, one stretched and one shrunk by delta: for rows
    x, y in their span, z_x.z_y falls short of x.y by ~delta * |x - y| while the residual
    norms stay ~0, so the bound misses the edge unless the defect phi enters the slack."""
    delta, d = 3e-3, 8
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(d, d)))
    v = (q[:, :2] * np.array([1 + delta, 1 - delta])).astype(np.float32)
    x = np.stack([q[:, 0] + q[:, 1], q[:, 0] + 1.3 * q[:, 1]]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dot = float(x[0].astype(np.float64) @ x[1].astype(np.float64))
    thr = dot - 3 * rules.REFINE  # an edge, decided without refinement
    assert edge_set(rules.dense_edges(x, thr)) == {(0, 1)}
    phi = lapack.orthonormality_defect(v)
    assert 2 * delta <= phi < 1e-2
    assert edge_set(rules.bounded_edges(x, thr, (v, 2, phi))) == {(0, 1)}
    assert edge_set(rules.bounded_edges(x, thr, (v, 2, 0.0))) == set()  # the term is needed


def test_defect_above_the_analysed_range_is_refused():
    with pytest.raises(ValueError, match="orthonormality defect"):
        rules._bound_slack(16, 96, 0.5)


def test_pruned_kernels_exact_with_numpy_eigensolver(monkeypatch):
    """The fallback basis (numpy's float64 eigh) keeps both kernels exact; the default
    (float32 LAPACK) is what test_devices and test_int8 run."""
    from bunny.select import int8

    monkeypatch.setattr(lapack, "_FN", [None])
    assert_exact_at_every_rank(lambda x, t, r: rules.bounded_edges(x, t, rules.bound_plan(x, t, rank=r), block=128))
    assert_exact_at_every_rank(lambda x, t, r: int8.edges(x, t, int8.plan(x, t, rank=r), block=128))
    monkeypatch.setattr(rules, "BOUND_MIN_ROWS", 100)
    x = isotropic_cluster()
    assert np.array_equal(rules.components(x, 0.86), rules.components(x, 0.86, edges=rules.dense_edges))
