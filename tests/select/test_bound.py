"""The eigenbasis of the pruning bound and the slack for its orthonormality defect."""
import numpy as np
import pytest

from bunny.select import bound, int8, rules
from selhelp import assert_exact_at_every_rank, edge_set, isotropic_cluster


def _moments(rng, d=96):
    a = rng.normal(size=(400, d)) * np.linspace(3, 0.1, d)
    return (a.T @ a).astype(np.float32)


def test_eigh_desc_is_largest_first_and_nearly_orthonormal():
    g = _moments(np.random.default_rng(0))
    v = bound.eigh_desc(g)
    assert v.dtype == np.float32 and v.shape == g.shape
    rayleigh = np.einsum("ij,ij->j", v.astype(np.float64), g.astype(np.float64) @ v.astype(np.float64))
    assert np.all(np.diff(rayleigh) <= 1e-3 * rayleigh[0])  # descending
    w64 = np.linalg.eigvalsh(g.astype(np.float64))[::-1]
    np.testing.assert_allclose(rayleigh, w64, rtol=1e-4, atol=1e-3 * w64[0])
    assert bound.orthonormality_defect(v) < 1e-5


def test_defect_bounds_the_spectral_norm():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(64, 40)))
    for eps in (0.0, 1e-6, 1e-3):
        v = (q + eps * rng.normal(size=q.shape)).astype(np.float32)
        v64 = v.astype(np.float64)
        true = np.linalg.norm(v64.T @ v64 - np.eye(40), 2)
        phi = bound.orthonormality_defect(v)
        assert true <= phi <= 40 * true + 1e-9


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
    phi = bound.orthonormality_defect(v)
    assert 2 * delta <= phi < 1e-2
    assert edge_set(bound.bounded_edges(x, thr, (v, 2, phi))) == {(0, 1)}
    assert edge_set(bound.bounded_edges(x, thr, (v, 2, 0.0))) == set()  # the term is needed


def test_defect_above_the_analysed_range_is_refused():
    with pytest.raises(ValueError, match="orthonormality defect"):
        bound._bound_slack(16, 96, 0.5)


def test_pruned_kernels_exact_at_every_rank():
    assert_exact_at_every_rank(lambda x, t, r: bound.bounded_edges(x, t, bound.bound_plan(x, t, rank=r), block=128))
    assert_exact_at_every_rank(lambda x, t, r: int8.edges(x, t, int8.plan(x, t, rank=r), block=128))


def test_planned_components_equal_the_full_products(monkeypatch):
    monkeypatch.setattr(bound, "BOUND_MIN_ROWS", 100)
    x = isotropic_cluster()
    assert np.array_equal(rules.components(x, 0.86), rules.components(x, 0.86, edges=rules.dense_edges))
