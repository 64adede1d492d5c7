"""Exact global windows and the draw without holding all rows in memory.

Rows are ordered by a key of unsigned columns (e.g. (score-descending key, gid)). The key
at a given rank is found by radix selection: each pass over the survivor files builds a
histogram of the next 16 bits among the rows matching the digits fixed so far, until few
enough rows match to sort them in memory. Memory: one 65536-bin histogram plus `cap` rows.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

Stream = Callable[[], Iterable[tuple[np.ndarray, ...]]]  # yields chunks of uint64 key columns


def _digits(widths):
    return [(c, sh) for c, w in enumerate(widths) for sh in range(w - 16, -1, -16)]


def _match(cols, fixed) -> np.ndarray:
    m = np.ones(len(cols[0]), dtype=bool)
    for c, sh, v in fixed:
        m &= ((cols[c] >> np.uint64(sh)) & np.uint64(0xFFFF)) == np.uint64(v)
    return m


def key_at(stream: Stream, widths: tuple[int, ...], total: int, rank: int, cap: int = 1 << 22):
    """The key (tuple of ints) at 0-based `rank` in ascending lexicographic order of the
    streamed keys; `total` is the number of streamed rows."""
    if not 0 <= rank < total:
        raise IndexError(rank)
    digits, fixed, count, r = _digits(widths), [], total, rank
    while count > cap and len(fixed) < len(digits):
        c, sh = digits[len(fixed)]
        hist = np.zeros(1 << 16, dtype=np.int64)
        for cols in stream():
            m = _match(cols, fixed)
            d = ((cols[c][m] >> np.uint64(sh)) & np.uint64(0xFFFF)).astype(np.int64)
            hist += np.bincount(d, minlength=1 << 16)
        cum = np.cumsum(hist)
        b = int(np.searchsorted(cum, r, side="right"))
        r -= int(cum[b - 1]) if b else 0
        count = int(hist[b])
        fixed.append((c, sh, b))
    parts = [[] for _ in widths]
    for cols in stream():
        m = _match(cols, fixed)
        for i, col in enumerate(cols):
            parts[i].append(col[m])
    keys = [np.concatenate(p) for p in parts]
    order = np.lexsort(keys[::-1])
    return tuple(int(k[order[r]]) for k in keys)


def at_least(cols, key) -> np.ndarray:
    """(n,) bool: row key >= `key`, lexicographically."""
    ge = np.zeros(len(cols[0]), dtype=bool)
    eq = np.ones(len(cols[0]), dtype=bool)
    for col, k in zip(cols, key):
        k = np.uint64(k)
        ge |= eq & (col > k)
        eq &= col == k
    return ge | eq


class Window:
    """Keep ranks [start, stop) of the ascending key order: a row is kept iff
    key(start) <= key < key(stop) (bounds that are past the end are open)."""

    def __init__(self, stream: Stream, widths, total: int, start: int, stop: int, cap: int = 1 << 22):
        self.total, self.start, self.stop = total, start, min(stop, total)
        self.empty = self.start >= self.stop
        self.lo = key_at(stream, widths, total, start, cap) if not self.empty else None
        self.hi = key_at(stream, widths, total, self.stop, cap) if self.stop < total and not self.empty else None

    @property
    def kept(self) -> int:
        return max(0, self.stop - self.start)

    def mask(self, cols) -> np.ndarray:
        if self.empty:
            return np.zeros(len(cols[0]), dtype=bool)
        m = at_least(cols, self.lo)
        if self.hi is not None:
            m &= ~at_least(cols, self.hi)
        return m
