"""Exact candidate pairs from int8 products: the Cauchy-Schwarz bound of `rules`, centred
and quantised, so that each pair costs int8 multiply-adds (`ort_ops`, VNNI: ~3.5x
float32's rate on one core, docs/benchmarks.md) instead of float32 ones.

For rows x, y of a cluster with a float32 centre mu (the mean of sampled rows), x~ = x - mu,
and a basis (orthonormal up to a measured defect, `bound._bound_slack`) whose first r
columns give coordinates z and residual norms b (b >= |x~_B|, as in `rules`):

    x.y = mu.x + mu.y - |mu|^2 + x~.y~,      x~.y~ <= z_x.z_y + b_x b_y + F

(F: float32 rounding, `_float_slack`). Centring turns the large coordinate every row
shares (the cluster's direction) into per-row terms, so the int8 scale fits the small
ones. With beta the median of b and d = b - beta, w = (z, d) has
z_x.z_y + b_x b_y = beta^2 + beta d_x + beta d_y + w_x.w_y. Quantised, w = s q + e with
q int8 and |q| <= qmax (127, or 63 on CPUs whose kernel saturates: `ort_ops.qmax`):

    w_x.w_y <= s^2 q_x.q_y + M (|e_x| + |e_y|),    M = max over rows of max(|w|, s |q|)

so x.y <= s^2 q_x.q_y + R_x + R_y + C0 with per-row R and a constant C0. A pair can have an
edge (x.y > t) only if q_x.q_y + P_y >= T_x, with P_y = ceil(R_y / s^2) (+1) and
T_x = floor((t - C0 - R_x) / s^2) (one unit lower than needed): integers, which enter the
int8 product itself as extra columns of digits (`_digits`), so each tile is one int8
product and one comparison with 0. Candidates are then decided exactly like every other
candidate (`rules._decide`): the quantisation only skips pairs that provably have no edge.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from bunny.select import bound, rules

# int8 multiply-adds per float32 one at equal time on one core (onnxruntime's MatMulInteger
# with VNNI against numpy's float32 GEMM; docs/benchmarks.md). Only steers the plan.
INT8_GAIN = 3.5
_INT32_SAFE = 2 ** 30  # |q.q| + |P| + |T| stays below this: no int32 overflow in the tile


@dataclass(frozen=True)
class Int8Plan(bound.Plan):
    """A `bound.Plan` of the int8 path: centred (mu is set), its basis holding room to grow
    (m >= r columns); phi bounds ||basis^T basis - I||_2 (`bound._bound_slack`)."""

    @property
    def vec(self) -> np.ndarray:
        return self.basis[:, : self.r]

    def grown(self) -> Int8Plan | None:
        """The same basis with GROW_COLS more columns, or None when there are none left."""
        r = min(self.r + GROW_COLS, self.basis.shape[1])
        return replace(self, r=r) if r > self.r else None


# A plan's r comes from a sample; when the candidates of the tiles done so far exceed this
# fraction of their pairs (each costs ~_PAIR_COST, 64 more columns ~18 multiply-adds per
# pair), the rest of the cluster is done with GROW_COLS more columns (`edges`).
GROW_FRAC = 2e-3
GROW_COLS = 64
_GROW_MIN_PAIRS = 1 << 20


def plan(x: np.ndarray, threshold: float, rank: int | None = None) -> Int8Plan | None:
    """The centred basis and rank for `edges`, or None when the full float32 product is
    expected to be cheaper (only the speed depends on this choice; `rank` forces r).
    An eigenbasis' first r columns are rotated (`bound.rotate_leading`): the int8 scale is set by
    the largest coordinate, which rotating lowers."""
    d = x.shape[1]
    got = bound.plan_rank(x, threshold, centre=True, col_cost=1.0 / INT8_GAIN, r_max=3 * d // 4,
                          r_step=32, quantised=True, rank=rank, keep=3 * d // 4, axes=True)
    if got is None:
        return None
    return Int8Plan(got.mu, got.basis, got.r, got.phi, got.axes)


def _float_slack(r: int, d: int, xt_sq_max: float, mu_norm: float, x_norm_max: float, phi: float = 0.0) -> float:
    """Upper bound of every float32 rounding in x.y's bound, for any pair: the
    Cauchy-Schwarz part (`bound._bound_slack`, on the rounded centred rows x~' = fl(x - mu)),
    the centring (|x~' - x~| <= u |x~| per row: 3u |x~|^2 per pair) and the float32 mu.x
    (gamma_d |mu| |x| per row, two rows), with a factor 2 of headroom on the last two."""
    u = 2.0 ** -24
    gamma_d = d * u / (1 - d * u)
    pair, _ = bound._bound_slack(r, d, phi)
    return pair * xt_sq_max + 2.0 * (3 * u * xt_sq_max + 2 * gamma_d * mu_norm * x_norm_max)


def _digits(v: np.ndarray, base: int) -> np.ndarray:
    """(n, m+1) int8 digits of int64 v with v = D[:, 0] + base * sum(D[:, 1:], axis=1), each
    within [-base, base]: the other side of the product holds 1 and m times base (`_weights`)."""
    hi = np.rint(v / base).astype(np.int64)
    low = v - base * hi  # within [-base/2, base/2]
    m = max(1, int(-(-np.abs(hi).max() // base)) if len(hi) else 1)
    out = np.empty((len(v), m + 1), np.int8)
    out[:, 0] = low
    for k in range(m):  # floor((hi + k) / m) over k sums to hi; each within ceil(|hi| / m) <= base
        out[:, k + 1] = np.floor_divide(hi + k, m)
    return out


def _weights(m1: int, base: int) -> np.ndarray:
    w = np.full(m1, base, np.int8)
    w[0] = 1
    return w


def _rows(x: np.ndarray, p: Int8Plan, chunk: int = 1024):
    """Per row: z (n, r) float32, b (n,) float64 (an upper bound of the residual norm),
    a = mu.x - |mu|^2 (float64 of a float32 dot), |x~'|^2; and over all rows max |z| and
    max |x| (float32 norms). In row chunks: each chunk's maxima are taken while it is in
    cache, and its coordinates are written straight into z."""
    n, d = x.shape
    r = p.r
    _, b_raise = bound._bound_slack(r, d, p.phi)
    mu2 = float(np.dot(p.mu.astype(np.float64), p.mu.astype(np.float64)))
    z = np.empty((n, r), np.float32)
    b, a, nt = np.empty(n), np.empty(n), np.empty(n)
    z_max = x_sq_max = 0.0
    for s in range(0, n, chunk):
        xs = x[s:s + chunk]
        xt = xs - p.mu
        if p.axes is None:
            zs = np.matmul(xt, p.vec, out=z[s:s + chunk])
        else:  # coordinate axes: the coordinates are the rows' own entries, exactly
            zs = np.take(xt, p.axes[:r], axis=1, out=z[s:s + chunk])
        z_max = max(z_max, float(zs.max()), -float(zs.min()))
        nn = np.einsum("ij,ij->i", xt, xt).astype(np.float64)
        b[s:s + chunk] = bound.residual_norms(nn, zs, b_raise)
        a[s:s + chunk] = (xs @ p.mu).astype(np.float64) - mu2
        nt[s:s + chunk] = nn
        x_sq_max = max(x_sq_max, float(np.einsum("ij,ij->i", xs, xs).max()))
    return z, b, a, nt, mu2, z_max, float(np.sqrt(x_sq_max))


def quantise(x: np.ndarray, threshold: float, p: Int8Plan, qmax: int = 127, chunk: int = 1024):
    """(L, R) int8 (n, k), every entry within [-qmax, qmax], with L[i].R[j] >= 0 whenever
    rows i, j may have an edge; None when the integers would not fit int32 (then the
    float32 bound is used)."""
    n, d = x.shape
    r = p.r
    z, b, a, nt, mu2, z_max, x_norm_max = _rows(x, p, chunk)
    beta = float(np.median(b)) if n else 0.0
    delta = b - beta
    s = max(z_max, float(np.abs(delta).max(initial=0.0))) / qmax
    if s == 0.0 or not np.isfinite(s):
        return None
    s = float(np.nextafter(np.float32(s), np.float32(np.inf)))  # a float32 scale, >= the float64 one
    q = np.empty((n, r + 1), np.int8)
    err, big = _quantise_rows(z, delta, s, qmax, q, chunk)
    mx = float(big.max())
    c0 = mu2 + beta * beta + _float_slack(r, d, float(nt.max()), np.sqrt(mu2), x_norm_max, p.phi)
    row = (a + beta * delta + mx * err) / (s * s)  # R / s^2
    shift = float(np.rint(np.median(row)))
    # float64 rounding of these (< 2^31 in size) is far below 1: one unit each way covers it
    pcol = np.ceil(row).astype(np.int64) + 1 - int(shift)
    trow = np.floor((threshold - c0) / (s * s) - row).astype(np.int64) - int(shift)
    g = (r + 1) * qmax * qmax  # |q_x.q_y| <= g
    lo, hi = int(pcol.min()), int(pcol.max())
    if max(abs(lo), abs(hi)) > _INT32_SAFE // 4:
        return None
    # beyond these T never (resp. always) holds whatever q.q: clipping changes no decision
    trow = np.clip(trow, -g + lo, g + hi + 1)
    dp, dt = _digits(pcol, qmax), _digits(-trow, qmax)
    if dp.shape[1] + dt.shape[1] > max(8, (r + 1) // 2):  # the offsets would cost more than they save
        return None
    k = r + 1 + dp.shape[1] + dt.shape[1]
    k8 = -(-k // 8) * 8
    left = np.zeros((n, k8), np.int8)
    right = np.zeros((n, k8), np.int8)
    left[:, :r + 1] = q
    right[:, :r + 1] = q
    at = r + 1
    left[:, at:at + dp.shape[1]] = _weights(dp.shape[1], qmax)
    right[:, at:at + dp.shape[1]] = dp
    at += dp.shape[1]
    left[:, at:at + dt.shape[1]] = dt
    right[:, at:at + dt.shape[1]] = _weights(dt.shape[1], qmax)
    return left, right


def _quantise_rows(z: np.ndarray, delta: np.ndarray, s: float, qmax: int, q: np.ndarray, chunk: int):
    """q[:, :r] = rint(z / s), q[:, r] = rint(delta / s) (int8, |q| <= qmax) and per row
    err >= |w - s q| and big >= max(|w|, s |q|), w = (z, delta), as float64 upper bounds.

    The r z-columns are done in float32 (s is a float32 value): with u = 2^-24 and
    e' = fl(z - fl(s q)), |e - e'| <= u |s q| + u |e'| per entry (two roundings), so
    |e| <= |e'| (1 + 2u) + u s qmax sqrt(r); the float32 sums of squares of e' and z are
    within gamma_(r+1) of the true ones (so is q.q, exact while below 2^24). Every float32
    result is raised by the factor `grow` (> (1 + gamma_(r+2))^2), which covers these.
    The residual column stays float64 (delta is a float64 value)."""
    n, r = z.shape
    u = 2.0 ** -24
    grow = 1.0 + 4.0 * (r + 2) * u / (1 - (r + 2) * u)
    s32 = np.float32(s)
    inv = np.float32(1.0) / s32
    err, big = np.empty(n), np.empty(n)
    for c in range(0, n, chunk):
        zc = z[c:c + chunk]
        qz = np.rint(zc * inv)  # |z / s| <= qmax, up to rounding: the clip is for that rounding
        np.clip(qz, -qmax, qmax, out=qz)
        q[c:c + chunk, :r] = qz
        e = zc - qz * s32
        qd = np.clip(np.rint(delta[c:c + chunk] / s), -qmax, qmax)
        q[c:c + chunk, r] = qd
        ed = delta[c:c + chunk] - s * qd
        ez = np.sqrt(np.einsum("ij,ij->i", e, e).astype(np.float64) * grow) * grow + u * s * qmax * np.sqrt(r)
        err[c:c + chunk] = np.sqrt(ez * ez + ed * ed) * (1 + 1e-12)
        wz = np.einsum("ij,ij->i", zc, zc).astype(np.float64) * grow
        qq = np.einsum("ij,ij->i", qz, qz).astype(np.float64) * grow + qd * qd
        big[c:c + chunk] = np.maximum(np.sqrt(wz + delta[c:c + chunk] ** 2), s * np.sqrt(qq)) * (1 + 1e-12)
    return err, big


def edges(x: np.ndarray, threshold: float, p: Int8Plan, block: int = 0, threads: int = 1):
    """`rules.dense_edges`' pairs, found with the quantised bound (with the float32 bound
    when it cannot be used: see `quantise`). `threads`: of each int8 product."""
    from bunny.select import ort_ops

    qmax = ort_ops.qmax()
    lr = quantise(x, threshold, p, qmax)
    if lr is None:  # the float32 bound on the same basis (any orthonormal basis gives a valid bound)
        yield from bound.bounded_edges(x, threshold, (np.ascontiguousarray(p.vec), p.r, p.phi), block)
        return
    left, ucols = lr[0], _as_uint8(lr[1])
    rows = block or rules.TILE_ROWS
    low = np.int32(np.iinfo(np.int32).min)
    band, upper = None, None
    buf = np.empty(rows * rows * rules.TILE_COLS_PER_ROW, np.int32)  # every tile's result, in turn
    pairs = cands = 0
    grow = True
    held = rules.Candidates(x, threshold)  # decided in batches, not tile by tile
    for a, bb, c, e in rules._tiles(len(x), rows):
        if c == a:  # a new row band: its int8 rows, transposed, for every tile of the band
            band = np.ascontiguousarray(left[a:bb].T)
        st = buf[: (e - c) * (bb - a)].reshape(e - c, bb - a)
        ort_ops.product(ucols[c:e], band, threads, out=st)  # st[j, i]: row a + i against column c + j
        if c == a:  # the band's diagonal square: keep j > i only
            if upper is None or upper.shape[0] != bb - a:
                upper = np.triu(np.ones((bb - a, bb - a), dtype=bool))
            st[: bb - a][upper] = low
        hit = np.flatnonzero(st.max(axis=1) >= 0)  # columns holding a candidate: a few per tile
        if len(hit):
            jj, ii = rules._above(st[hit], -1)  # candidates: >= 0
            cands += len(ii)
            if (got := held.add(ii + a, hit[jj] + c)) is not None:
                yield got
        pairs += st.size
        if grow and pairs >= _GROW_MIN_PAIRS and cands > GROW_FRAC * pairs:
            # the sample misjudged r (e.g. a few rows far out set a coarse int8 scale): the tiles
            # done are complete; the others use more columns, if any are left
            bigger = p.grown()
            lr = quantise(x, threshold, bigger, qmax) if bigger is not None else None
            if lr is None:
                grow = False
            else:
                p, left, ucols = bigger, lr[0], _as_uint8(lr[1])
                band = np.ascontiguousarray(left[a:bb].T)
            pairs = cands = 0
    if (got := held.flush()) is not None:
        yield got


def _as_uint8(right: np.ndarray) -> np.ndarray:
    """The product takes (uint8 - 128) on its left: an int8's bits xor 0x80 are that uint8."""
    return right.view(np.uint8) ^ np.uint8(0x80)
