"""The eigenbasis of step 1's pruning bound, in float32.

numpy's `linalg.eigh` always works in float64: 0.08 s for a 768 x 768 matrix on one core,
about a sixth of a 20k-row cluster's step 1. LAPACK's float32 `ssyevd` takes half that.
numpy does not expose it, but its Linux wheels ship OpenBLAS with the LAPACKE interface
(`numpy.libs/libscipy_openblas64_*.so`, symbol `scipy_LAPACKE_ssyevd64_`), which is called
here through ctypes; threadpoolctl's BLAS limit applies to it (the same library).

The float32 eigenvectors are orthonormal only to ~1e-6, not ~1e-15: the bound's slack
takes the measured defect into account (`orthonormality_defect`, `rules._bound_slack`),
so the edges stay exact. Where the library is not found (another numpy build), numpy's
float64 `eigh` is used; only the speed differs (`backend()` says which is in use).

`rotate` mixes a basis' leading columns by a fixed random rotation (int8 plans, `int8.plan`).
"""
from __future__ import annotations

import ctypes
import glob
import os
import threading

import numpy as np

_LOCK = threading.Lock()
_FN: list = []  # [function or None], resolved once
_ROW_MAJOR = 101


def _load():
    with _LOCK:
        if not _FN:
            fn = None
            libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
            for path in sorted(glob.glob(os.path.join(libs, "libscipy_openblas64_*.so"))):
                try:
                    fn = ctypes.CDLL(path).scipy_LAPACKE_ssyevd64_
                except (OSError, AttributeError):
                    continue
                fn.restype = ctypes.c_int64
                fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.c_void_p]
                break
            _FN.append(fn)
    return _FN[0]


def backend() -> str:
    return "lapacke-ssyevd" if _load() is not None else "numpy-eigh-float64"


def eigh_desc(g: np.ndarray) -> np.ndarray:
    """(d, d) float32 eigenvectors (columns) of the symmetric matrix g, largest eigenvalue
    first. Orthonormal to float32 accuracy: measure with `orthonormality_defect`."""
    fn = _load()
    d = g.shape[0]
    if fn is None or d == 0:
        return eigh_desc_float64(g)
    a = np.array(g, dtype=np.float32, order="C")  # overwritten by the eigenvectors
    w = np.empty(d, np.float32)
    info = fn(_ROW_MAJOR, b"V", b"U", d, a.ctypes.data, d, w.ctypes.data)
    if info != 0:  # not converged (or a bad argument): numpy's float64 solver instead
        return eigh_desc_float64(g)
    return np.ascontiguousarray(a[:, ::-1])  # ascending -> descending


def eigh_desc_float64(g: np.ndarray) -> np.ndarray:
    """`eigh_desc` computed by numpy's float64 `eigh`, rounded to float32 (orthonormal to
    ~1e-7: the rounding)."""
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
    """A fixed (seeded) random orthogonal (r, r) float64 matrix, made once per process."""
    with _LOCK:
        got = _ROTATIONS.get(r)
    if got is None:
        q, t = np.linalg.qr(np.random.default_rng(r).standard_normal((r, r)))
        got = q * np.where(np.diagonal(t) < 0, -1.0, 1.0)  # Haar-distributed: signs fixed by R's diagonal
        with _LOCK:
            _ROTATIONS[r] = got
    return got


def rotate(basis: np.ndarray, r: int) -> np.ndarray:
    """The basis with its first r columns rotated among themselves (float32 of a float64
    product): the same span, so the same bound in exact arithmetic, but every row's energy
    in it is spread evenly over the r coordinates. An eigenbasis puts most of it in the
    first few, whose largest value then sets the int8 scale of all (`quantise`): on a 1/i
    spectrum rotating lowers the largest coordinate ~3x and so the quantisation's slack,
    and leaves ~5x fewer candidates at the same rank. The columns after r (`Int8Plan.grown`)
    stay eigenvectors; the orthonormality defect is measured on the result."""
    out = basis.copy()
    out[:, :r] = basis[:, :r].astype(np.float64) @ rotation(r)
    return out
