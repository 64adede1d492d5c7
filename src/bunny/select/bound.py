"""Exact pruning of step 1's pair search in large clusters: the Cauchy-Schwarz bound on an
eigenbasis (or on coordinate axes), its planner, and the float32 products over it
(`bounded_edges`; the int8 products over the same plan are in `int8.py`).

With an orthonormal basis V of R^d split into its first r columns (A) and the rest (B),
    x.y = x_A.y_A + x_B.y_B <= z_x.z_y + |x_B| |y_B|,   z = V_A^T x,  |x_B|^2 = |x|^2 - |z|^2
(Cauchy-Schwarz). A pair whose bound is not above the threshold has no edge, whatever its
exact dot. With V the eigenvectors of the cluster's second-moment matrix, the first r of the
d dimensions carry most of |x|^2, and the bound (one (r+1)-column product per pair) rules
out almost every pair; the few pairs left are decided like any other candidate
(`rules._decide`). The edges are exactly `rules.dense_edges`' edges: the pruning only skips
pairs that provably have none. Floating point: see `_bound_slack`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bunny.select import rules

BOUND_MIN_ROWS = 6000  # below this the full product is about as cheap as building the basis
_PAIR_COST = 40000.0  # one candidate pair (gather two rows, a dot: ~1 us) in multiply-adds
_SAMPLE = 512  # rows used to estimate how many pairs each r leaves (131k pairs)
_MOMENT_ROWS = 4096  # rows used for the second-moment matrix


def _bound_slack(r: int, d: int, phi: float = 0.0) -> tuple[float, float]:
    """Worst-case float32 rounding of the bound, as multiples of |x| |y| (rows) and |x|^2.

    The basis V (d, r) is a float32 matrix whose columns are orthonormal up to
    phi >= ||V^T V - I||_2 (measured: `orthonormality_defect`). With P the projector
    onto its span, x.y <= (Px).(Py) + |P'x||P'y| (P' = I - P), and for the exact z = V^T x:
    (Px).(Py) = z_x (V^T V)^-1 z_y <= z_x.z_y + phi (1 + phi) / (1 - phi) |x||y| and
    |P'x|^2 <= |x|^2 - |z|^2 / (1 + phi) <= |x|^2 - |z|^2 + phi |x|^2 (|z|^2 <= (1 + phi)|x|^2).

    z' is computed in float32: |z' - z| <= sqrt(r) (gamma_d (1 + phi) + 2^-24) |x| =: c |x|
    (Higham's bound for each of the r dots, columns of norm <= 1 + phi; 2^-24 more as
    headroom). Then |z'_x.z'_y - z_x.z_y| <= (2c + c^2)|x||y| (phi <= 1e-2: the factor 2
    below covers sqrt(1 + phi)), and |x_B|^2 computed as |x|^2 - |z'|^2 is raised by
    (2c + c^2 + phi)|x|^2, plus the float32 rounding of both squared norms, so it is never
    below the true |P'x|^2. The final (r+1)-term float32 product adds gamma_(r+1) (1 + c)^2 |x||y|
    (both bound terms are <= (1 + c)|x||y| in absolute sum). Returns (per-pair slack, b^2
    raise), each to be multiplied by the norms; the factor 2 is headroom."""
    if not 0.0 <= phi <= 1e-2:
        raise ValueError(f"basis orthonormality defect {phi} outside [0, 1e-2]")
    u = 2.0 ** -24
    gamma = lambda m: m * u / (1 - m * u)  # noqa: E731
    c = np.sqrt(r) * (gamma(d) * (1 + phi) + u)
    skew = phi * (1 + phi) / (1 - phi)
    pair = 2.0 * ((2 * c + c * c) + gamma(r + 1) * (1 + c) ** 2 + 2 * u + skew)
    # |x|^2 and |z'|^2 are float32 sums too: gamma_d |x|^2 and gamma_r (1 + c)^2 |x|^2
    return pair, 2.0 * (2 * c + c * c + gamma(d) + gamma(r) * (1 + c) ** 2 + phi)


def eigenbasis(m: np.ndarray, cols: int, vec: np.ndarray | None = None, rotate: int = 0) -> tuple[np.ndarray, float]:
    """(basis (d, cols) float32, phi): the leading eigenvectors of the symmetric second-moment
    matrix m, and their orthonormality defect (`_bound_slack`). `vec`: m's eigenvectors
    (`eigh_desc`) when already computed. `rotate` > 0: the first `rotate` columns rotated
    among themselves (`rotate_leading`) before the defect is measured (on the basis the
    bound uses)."""
    v = np.ascontiguousarray((eigh_desc(m) if vec is None else vec)[:, :cols])
    basis = rotate_leading(v, rotate) if rotate else v
    return basis, orthonormality_defect(basis)


# The defect assumed while a rank is searched for (only steers the choice; the plan's basis
# is measured): eigenvectors rounded to float32 at d 768 measure ~1e-6 to 1e-5.
_PHI_GUESS = 1e-5


@dataclass(frozen=True)
class Plan:
    """A pruning plan: `basis` (d, m) float32, orthonormal up to `phi`, of which the bound
    uses the first r columns; `mu` the centre (or None). `axes`: set when the basis is m
    coordinate axes (basis[:, j] = e_axes[j], phi = 0), whose coordinates are a column
    gather of the rows instead of a product with the basis."""
    mu: np.ndarray | None
    basis: np.ndarray
    r: int
    phi: float
    axes: np.ndarray | None = None


def plan_rank(x: np.ndarray, threshold: float, *, centre: bool = False, col_cost: float = 1.0,
              r_max: int | None = None, r_step: int = 16, quantised: bool = False, rank: int | None = None,
              keep: int = 0, axes: bool = False) -> Plan | None:
    """A `Plan` for a pruning bound, or None when the full float32 product is expected to be
    cheaper. The basis: eigenvectors of the second moments of the rows (minus the float32
    mean of the sampled rows, when `centre`), orthonormal up to phi (`eigenbasis`), m =
    max(r, keep) columns; with `axes`, also the coordinate axes of largest variance, when
    they are estimated to cost less, and only the axes when the coordinates are uncorrelated
    (`uncorrelated`: the eigenvectors would be the axes, up to sampling noise). r: the rank
    whose estimated cost per pair is least: (r + 1) * col_cost for the products, the rows'
    coordinates (2 d r / n for a basis, free for axes) and the candidates left on a sample of
    rows. With `quantised`, the eigenbasis' first r columns are to be rotated (`int8.plan`),
    which the estimate of the int8 scale assumes. Only the speed depends on these choices,
    never the result (`rank` forces r, for tests, with the eigenbasis)."""
    n, d = x.shape
    if rank is None and (n < BOUND_MIN_ROWS or d < 64):
        return None
    # second moments (BLAS syrk) of at most _MOMENT_ROWS evenly spaced rows: the basis and
    # the centre only steer the pruning (the bound is exact for any float32 centre and any
    # basis), so a sample that finds the same leading directions and mean is enough
    step = max(2, n // _MOMENT_ROWS)
    sub = x[::step]
    mu = sub.mean(axis=0, dtype=np.float64).astype(np.float32) if centre else None
    if centre:
        sub = sub - mu
    r_max = r_max or d // 2
    moments = sub.T @ sub
    if rank is not None:
        basis, phi = eigenbasis(moments, max(rank, keep), rotate=rank if quantised else 0)
        return Plan(mu, basis, rank, phi)
    # uncorrelated coordinates: the eigenvectors are the axes up to noise, and the eigenbasis
    # (with its rank search a noticeable part of a large cluster's work) is skipped
    eigen = not (axes and uncorrelated(moments, len(sub)))
    if eigen:
        vec = eigh_desc(moments)[:, :min(d, max(r_max, keep))]
    # the costs are estimated on rows the moments did not see (odd offsets from the moment
    # rows): on the moment rows themselves the eigenbasis looks better than it is
    s = x[1::step][np.linspace(0, (n - 2) // step, min((n - 1) // step + 1, _SAMPLE)).astype(np.int64)]
    m = len(s)
    base = np.zeros((m, m), np.float32)  # the bound's exact part before any coordinate
    if centre:  # x.y = mu.x + mu.y - |mu|^2 + (x - mu).(y - mu)
        a = s @ mu - np.float32(mu @ mu)
        base += a[:, None]
        base += a[None, :]
        base += np.float32(mu @ mu)
        s = s - mu
    nn = np.einsum("ij,ij->i", s, s).astype(np.float64)
    search = dict(threshold=threshold, d=d, col_cost=col_cost, r_max=r_max, r_step=r_step, quantised=quantised)
    best, best_cost = None, 0.7 * d  # the full product: d float32 multiply-adds per pair
    if eigen:
        z = s @ vec[:, :r_max]
        best, best_cost = _rank_search(z, nn, base, _PHI_GUESS, 2.0 * d / n, best_cost,
                                       rotated_rows=n if quantised else 0, **search)
    if axes:
        order = np.argsort(-np.diagonal(moments), kind="stable")  # largest variance first
        za = s[:, order[:r_max]]
        # the axes can only win where they hold nearly as much of the sample's energy as the
        # eigenbasis at its rank (isotropic clusters: ~96%; a steep spectrum: ~40%, no search)
        at = best or r_max
        near = not eigen or (np.einsum("ij,ij->", za[:, :at], za[:, :at])
                             >= 0.9 * np.einsum("ij,ij->", z[:, :at], z[:, :at]))
        r_id = _rank_search(za, nn, base, 0.0, 0.0, best_cost, **search)[0] if near else None
        if r_id is not None:
            picked = order[:max(r_id, keep)]
            basis = np.zeros((d, len(picked)), np.float32)
            basis[picked, np.arange(len(picked))] = 1.0
            return Plan(mu, basis, r_id, 0.0, np.ascontiguousarray(picked))
    if best is None:
        return None
    basis, phi = eigenbasis(moments, max(best, keep), vec, rotate=best if quantised else 0)
    return Plan(mu, basis, best, phi)


# `uncorrelated`: the ratio below is 1 in expectation for independent coordinates, whatever
# their variances and distributions; ~1.1 on isotropic clusters (20k rows, d 768)
# and ~120 on a 1/i spectrum in a random basis
_CORRELATION_RATIO = 2.0


def uncorrelated(moments: np.ndarray, rows: int) -> bool:
    """Whether the (centred) second-moment matrix of `rows` rows is diagonal up to sampling
    noise: rows * sum_{i != j} M_ij^2 / sum_{i != j} M_ii M_jj < 2. For independent
    zero-mean coordinates E[M_ij^2] = rows E[x_i^2] E[x_j^2] and M_ii ~ rows E[x_i^2], so the
    ratio is ~1; correlations the sample can see raise it. Then the axes of largest
    variance are the leading eigenvectors (up to that noise) and prune as well. Correlated
    structure counts by its share of the energy: one direction off the axes holding a
    fraction f of it adds ~rows f^2, so at 4096 rows any f above ~2% is seen."""
    m = moments.astype(np.float64)
    diag = np.diagonal(m)
    off = np.einsum("ij,ij->", m, m) - np.dot(diag, diag)
    indep = diag.sum() ** 2 - np.dot(diag, diag)
    return indep > 0 and rows * off < _CORRELATION_RATIO * indep


def _rank_search(z: np.ndarray, nn: np.ndarray, base: np.ndarray, phi: float, coord_cost: float, to_beat: float, *,
                 threshold: float, d: int, col_cost: float, r_max: int, r_step: int, quantised: bool,
                 rotated_rows: int = 0):
    """(r, cost per pair) of the cheapest rank for the sample's coordinates z (m, >= r_max),
    or (None, to_beat) when no rank costs less than `to_beat` (the full product's cost, or
    another basis's). `coord_cost`: the rows' coordinates, per pair and column.
    `rotated_rows` > 0 (quantised): the first r columns will be rotated at random over the
    cluster's `rotated_rows` rows, which spreads each row's energy |z|^2 evenly over them: the
    largest coordinate is then estimated as sqrt(median |z|^2 / r * 2 ln(rows r)) (the
    largest of rows * r Gaussians of that variance), not the sample's largest."""
    m = len(z)
    dots = base.copy()
    cum = np.cumsum(z.astype(np.float64) ** 2, axis=1)
    z_max = np.maximum.accumulate(np.abs(z).max(axis=0)) if quantised else None  # max |z[:, :r]| = z_max[r - 1]
    pairs = m * (m - 1) // 2
    tot = np.empty((m, m), np.float32)
    best, best_cost, r0 = None, to_beat, 0
    for r in range(r_step, r_max + 1, r_step):
        if (r + 1) * col_cost + r * coord_cost >= best_cost:  # the products alone already cost more
            break
        dots += z[:, r0:r] @ z[:, r0:r].T
        r0 = r
        b = np.sqrt(np.maximum(nn - cum[:, r - 1], 0.0)).astype(np.float32)
        slack = _bound_slack(r, d, phi)[0] * nn.max()
        if quantised:  # int8 (`int8.quantise`): 2 M |e|, |e| ~ sqrt((r + 1) / 12) s,
            # s = max|(z, b - median b)| / 127
            if rotated_rows:
                top = np.sqrt(np.median(cum[:, r - 1]) / r * 2.0 * np.log(rotated_rows * r))
            else:
                top = float(z_max[r - 1])
            big = max(top, float(np.abs(b - np.median(b)).max()))
            slack += 2.5 * np.sqrt(nn.max() * (r + 1) / 12) * big / 127
        np.multiply.outer(b, b, out=tot)
        tot += dots
        # the whole symmetric matrix: each pair twice, plus the m diagonal entries
        # (|x|^2 >= any cut below 1, so always above)
        above = np.count_nonzero(tot > threshold - slack)
        frac = max(0, above - m) / 2 / pairs
        cost = (r + 1) * col_cost + r * coord_cost + frac * _PAIR_COST
        if cost < best_cost:
            best, best_cost = r, cost
        if frac < 1e-4:  # a larger r only adds products
            break
    return best, best_cost


def bound_plan(x: np.ndarray, threshold: float, rank: int | None = None):
    """(basis (d, r) float32, r, phi) for `bounded_edges` (uncentred, float32 products), or
    None when the full product is expected to be cheaper (see `plan_rank`)."""
    got = plan_rank(x, threshold, rank=rank)
    return None if got is None else (got.basis, got.r, got.phi)


def residual_norms(nn: np.ndarray, z: np.ndarray, b_raise: float) -> np.ndarray:
    """(n,) float64 b >= |x_B|, the residual norms of rows with float64 squared norms nn and
    float32 basis coordinates z, with `_bound_slack`'s raise b_raise (times nn) for the
    rounding; rounded up so that it stays an upper bound through float32."""
    b2 = nn - np.einsum("ij,ij->i", z, z).astype(np.float64) + b_raise * nn
    return np.sqrt(np.maximum(b2, 0.0)) * (1 + 2.0 ** -20)


def bounded_edges(x: np.ndarray, threshold: float, plan, block: int = 0):
    """`rules.dense_edges`' pairs, found with the Cauchy-Schwarz bound of `bound_plan`."""
    vec, r, phi = plan
    n, d = x.shape
    pair_slack, b_raise = _bound_slack(r, d, phi)
    z = x @ vec  # (n, r) float32
    nn = np.einsum("ij,ij->i", x, x).astype(np.float64)
    b = residual_norms(nn, z, b_raise)
    zb = np.empty((n, r + 1), np.float32)
    zb[:, :r] = z
    zb[:, r] = b
    del z
    cut = threshold - pair_slack * float(nn.max())  # |x||y| <= max |x|^2
    held = rules.Candidates(x, threshold)
    for a, bb, c, e in rules._tiles(n, block or rules.TILE_ROWS):
        s = zb[a:bb] @ zb[c:e].T
        if c == a:
            rules._upper(s, a, bb)
        ii, jj = rules._above(s, cut)
        if len(ii) and (got := held.add(ii + a, jj + c)) is not None:
            yield got
    if (got := held.flush()) is not None:
        yield got


# ---- the basis ------------------------------------------------------------------------
def eigh_desc(g: np.ndarray) -> np.ndarray:
    """(d, d) float32 eigenvectors (columns) of the symmetric matrix g, largest eigenvalue
    first: numpy's `eigh` (float64), rounded to float32, so orthonormal only to float32
    accuracy; the bound uses the measured defect (`orthonormality_defect`)."""
    _, vec = np.linalg.eigh(np.asarray(g, np.float64))
    return np.ascontiguousarray(vec[:, ::-1], dtype=np.float32)


def orthonormality_defect(v: np.ndarray) -> float:
    """phi >= ||V^T V - I||_2 for the float32 matrix V (d, m) taken exactly: the Frobenius
    norm of V^T V - I, computed in float64. Products of float32 values are exact in float64;
    each sum of d of them is off by < d 2^-53 (|columns| ~ 1), so the matrix by < m d 2^-53
    in Frobenius norm: twice that is added, and 1e-15 relative for the norm's own rounding."""
    d, m = v.shape
    v64 = v.astype(np.float64)
    f = v64.T @ v64
    f[np.diag_indices_from(f)] -= 1.0
    return float(np.sqrt(np.einsum("ij,ij->", f, f))) * (1 + 1e-15) + 2.0 * m * d * 2.0 ** -53


_ROTATIONS: dict = {}


def rotation(r: int) -> np.ndarray:
    """A fixed (seeded) random orthogonal (r, r) float64 matrix, made once per process (from
    several threads at once, each makes the same matrix)."""
    got = _ROTATIONS.get(r)
    if got is None:
        q, t = np.linalg.qr(np.random.default_rng(r).standard_normal((r, r)))
        got = q * np.where(np.diagonal(t) < 0, -1.0, 1.0)  # Haar-distributed: signs fixed by R's diagonal
        _ROTATIONS[r] = got
    return got


def rotate_leading(basis: np.ndarray, r: int) -> np.ndarray:
    """The basis with its first r columns rotated among themselves (float32 of a float64
    product): the same span, so the same bound in exact arithmetic, but every row's energy
    in it is spread evenly over the r coordinates. An eigenbasis puts most of it in the
    first few, whose largest value then sets the int8 scale of all (`int8.quantise`), and
    with it the quantisation's slack. The columns after r (`int8.Int8Plan.grown`) stay
    eigenvectors; the orthonormality defect is measured on the result."""
    out = basis.copy()
    out[:, :r] = basis[:, :r].astype(np.float64) @ rotation(r)
    return out
