"""The LAION embedding folder: discovery, validation and memory-mapped reading.

    img_emb/img_emb_0000.npy, text_emb/text_emb_0000.npy, metadata/metadata_0000.parquet

Shards are numbered from 0 without gaps; the global id of a row is its offset in the
concatenation of all shards. Nothing here loads a whole shard: embeddings stay
memory-mapped and only the rows asked for are read (as float32). The folder may be a URL
(fsspec, `storage.py`): the check streams its shards, tasks map local copies.
"""
from __future__ import annotations

import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bunny.errors import BunnyError
from bunny.select import storage
from bunny.select.ort_ops import to_float32

_KINDS = {"img": ("img_emb", "img_emb_", ".npy"),
          "txt": ("text_emb", "text_emb_", ".npy"),
          "meta": ("metadata", "metadata_", ".parquet")}
NORM_TOL = 1e-2  # |1 - ||x||| above this is "not unit norm" (float16 storage is ~1e-3 off)


@dataclass(frozen=True)
class Shard:
    index: int
    img: str  # paths or URLs
    txt: str
    meta: str
    rows: int
    offset: int  # gid of the shard's first row


@dataclass(frozen=True)
class Layout:
    root: str  # a path or a URL
    shards: tuple[Shard, ...]
    dim: int
    renormalize: bool = False

    @property
    def rows(self) -> int:
        return self.shards[-1].offset + self.shards[-1].rows if self.shards else 0

    def offsets(self) -> np.ndarray:
        """(S+1,) int64 cumulative row counts, for gid -> shard lookups."""
        return np.array([s.offset for s in self.shards] + [self.rows], dtype=np.int64)

    def img(self, shard: int) -> np.ndarray:
        return open_npy(self.shards[shard].img)

    def txt(self, shard: int) -> np.ndarray:
        return open_npy(self.shards[shard].txt)

    def stream(self, shard: int, kind: str):
        """The shard's "img_emb" or "text_emb" rows for one pass of row ranges: memory-mapped,
        or for a URL read range by range (`storage.StreamedNpy`) without a local copy."""
        name = self.shards[shard].img if kind == "img_emb" else self.shards[shard].txt
        return storage.StreamedNpy(name) if storage.is_url(name) else open_npy(name)

    def rows_f32(self, arr: np.ndarray, rows) -> np.ndarray:
        """Read `rows` of a memory-mapped (N, d) array as float32, renormalised if asked.

        Renormalisation is per row (float64 norm), so it gives the same bits whatever block
        the row is read in."""
        return self._renormalised(to_float32(np.asarray(arr[rows])))

    def _renormalised(self, x: np.ndarray) -> np.ndarray:
        if self.renormalize:
            n = np.sqrt(np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float64)))
            x = (x / np.where(n > 0, n, 1.0)[:, None]).astype(np.float32)
        return x

    def gather_stored(self, which, parts) -> np.ndarray:
        """Rows of several shards as one array of their stored values: float16 when every
        part is float16, else float32 (float16 -> float32 is exact and one-to-one, so rows
        are equal here exactly when their float32 values are). Not renormalised."""
        arrs = [which(s.index) for s, _ in parts]
        dt = np.float16 if all(a.dtype == np.float16 for a in arrs) else np.float32
        out = np.empty((sum(len(r) for _, r in parts), self.dim), dt)
        at = 0
        for a, (_, r) in zip(arrs, parts):
            if a.dtype == dt:  # mode "clip" (rows are valid): "raise" would buffer the output
                np.take(a, r, axis=0, out=out[at:at + len(r)], mode="clip")
            else:
                to_float32(a[r], out[at:at + len(r)])
            at += len(r)
        return out

    def stored_to_f32(self, raw: np.ndarray, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """float32 values (renormalised if asked) of raw[rows], for `gather_stored`'s array:
        the same bits `rows_f32` reads for those rows. Converted a chunk at a time, with no
        whole-array stored copy of the selection."""
        out = np.empty((len(rows), raw.shape[1]), np.float32)
        for a in range(0, len(rows), chunk):
            if self.renormalize:
                out[a:a + chunk] = self.rows_f32(raw, rows[a:a + chunk])
            else:
                to_float32(raw[rows[a:a + chunk]], out[a:a + chunk])
        return out

    def gather_f32(self, which, parts) -> np.ndarray:
        """Rows of several shards as one float32 array: `parts` is [(shard, rows)], `which`
        is `self.img` or `self.txt`. Each part is converted straight into its place in the
        result (no per-part float32 copies to concatenate)."""
        out = np.empty((sum(len(r) for _, r in parts), self.dim), np.float32)
        at = 0
        for s, r in parts:
            if self.renormalize:
                out[at:at + len(r)] = self.rows_f32(which(s.index), r)
            else:
                to_float32(which(s.index)[r], out[at:at + len(r)])
            at += len(r)
        return out

    def keys(self, shard: int, rows: np.ndarray | None = None) -> np.ndarray:
        keys = np.asarray(self.key_column(shard).to_pylist(), dtype=object)
        return keys if rows is None else keys[rows]

    def key_column(self, shard: int):
        """The shard's `key` column as one pyarrow string array."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        # ParquetFile, not pq.read_table: the latter goes through pyarrow.dataset, whose first
        # use in a process is slow (imports and set-up)
        with storage.open_binary(self.shards[shard].meta) as f:
            col = pq.ParquetFile(f).read(columns=["key"]).column("key")
        # cast only what is not a string already: the first cast in a process sets up
        # pyarrow's compute functions
        chunks = [c if c.type == pa.string() else c.cast(pa.string()) for c in col.chunks]
        if len(chunks) == 1:
            return chunks[0]
        return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


_MAPS: dict = {}
_MAPS_LOCK = threading.Lock()


def open_npy(path) -> np.ndarray:
    """Memory-mapped .npy, opened once per process (and again if the file changed); a URL's
    local copy (`storage.local_copy`)."""
    if storage.is_url(path):
        path = storage.local_copy(str(path))
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    arr = _MAPS.get(key)
    if arr is None:
        arr = np.load(path, mmap_mode="r")
        with _MAPS_LOCK:
            if len(_MAPS) >= 256:  # each map holds a file descriptor
                _MAPS.clear()
            _MAPS[key] = arr
    return arr


def _numbered(folder: str, prefix: str, suffix: str) -> dict[int, str]:
    found = {}
    pat = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
    for name in storage.list_names(folder):
        m = pat.match(name)
        if m:
            found[int(m.group(1))] = storage.join(folder, name)
    return found


def _npy_shape(path: str) -> tuple[tuple[int, ...], np.dtype]:
    with storage.open_binary(path) as f:
        shape, dtype, _ = storage.npy_header(f)
    return shape, dtype


def _parquet_meta(path: str) -> tuple[int, list[str]]:
    """(row count, column names) of a parquet file, from its footer."""
    import pyarrow.parquet as pq

    with storage.open_binary(path) as f:
        pf = pq.ParquetFile(f)
        return pf.metadata.num_rows, pf.schema_arrow.names


def open_layout(root, renormalize: bool = False) -> Layout:
    """Discover and check the shards of a LAION embedding folder, a path or a URL (shapes,
    counts, names).

    Raises BunnyError naming the shard at fault. Values (NaN, norms) are checked by
    `check_values`, which streams the data."""
    root = str(root) if storage.is_url(root) else str(Path(root))
    if not storage.is_dir(root):
        raise BunnyError(f"input folder {root} does not exist")
    found = {k: _numbered(storage.join(root, f), pre, suf) for k, (f, pre, suf) in _KINDS.items()}
    if not found["img"]:
        raise BunnyError(f"{root}: no image shards img_emb/img_emb_NNNN.npy")
    numbers = sorted(set().union(*[set(v) for v in found.values()]))
    for n in numbers:
        missing = [f"{_KINDS[k][0]}/{_KINDS[k][1]}{n:04d}{_KINDS[k][2]}" for k in _KINDS if n not in found[k]]
        if missing:
            raise BunnyError(f"{root}: shard {n} is incomplete: missing {', '.join(missing)}")
    gaps = sorted(set(range(numbers[-1] + 1)) - set(numbers))
    if gaps:
        raise BunnyError(f"{root}: shard {gaps[0]} is missing (shards found: {numbers[0]}..{numbers[-1]}, "
                         f"{len(gaps)} missing); gids would shift")
    shards, offset, dim = [], 0, None
    for n in numbers:
        (ishape, idt), (tshape, tdt) = _npy_shape(found["img"][n]), _npy_shape(found["txt"][n])
        for name, shape, dt in (("img_emb", ishape, idt), ("text_emb", tshape, tdt)):
            if len(shape) != 2 or dt not in (np.float16, np.float32):
                raise BunnyError(f"shard {n} {name}: expected a (N, d) float16/float32 array, got {shape} {dt}")
        mrows, names = _parquet_meta(found["meta"][n])
        if not ishape[0] == tshape[0] == mrows:
            raise BunnyError(f"shard {n}: row counts differ: img_emb {ishape[0]}, text_emb {tshape[0]}, "
                             f"metadata {mrows}")
        if ishape[1] != tshape[1]:
            raise BunnyError(f"shard {n}: image dim {ishape[1]} != text dim {tshape[1]}")
        if dim is None:
            dim = ishape[1]
        elif ishape[1] != dim:
            raise BunnyError(f"shard {n}: dim {ishape[1]} differs from shard 0's dim {dim}")
        if "key" not in names:
            raise BunnyError(f"shard {n} metadata: no `key` column (columns: {names})")
        shards.append(Shard(n, found["img"][n], found["txt"][n], found["meta"][n], ishape[0], offset))
        offset += ishape[0]
    return Layout(root, tuple(shards), dim, renormalize)


def _check_part(layout: Layout, s: Shard, kind: str, block: int, assign=None):
    """(error or None, rows off unit norm, first such row's note, labels) of one shard's
    image or text rows. `assign` (image rows only): float32 rows -> (n,) int32 nearest
    centroids, applied to each checked block as `rows_f32` reads it (renormalised if
    asked), so the assignment needs no second pass over the shard; labels is None without."""
    arr = layout.stream(s.index, kind)
    bad, first = 0, None
    labels = np.empty(s.rows, np.int32) if assign is not None else None
    for a in range(0, s.rows, block):
        x = to_float32(np.asarray(arr[a:a + block]))
        n2 = np.einsum("ij,ij->i", x, x)  # NaN/inf in a row make its n2 non-finite
        finite = np.isfinite(n2)
        if not finite.all():
            rows = np.flatnonzero(~np.isfinite(n2))
            really = rows[~np.isfinite(x[rows]).all(axis=1)]  # a huge finite row overflows n2
            if len(really):
                r = a + int(really[0])
                return f"shard {s.index} {kind} row {r} (gid {s.offset + r}): NaN or infinite values", bad, first, None
        n = np.sqrt(n2)  # float32 is plenty for a 1e-2 tolerance
        if layout.renormalize and (n == 0).any():
            r = a + int(np.flatnonzero(n == 0)[0])
            return f"shard {s.index} {kind} row {r}: zero vector cannot be renormalised", bad, first, None
        if labels is not None:
            labels[a:a + block] = assign(layout._renormalised(x))
        off = np.abs(n - 1.0) > NORM_TOL
        if off.any():
            bad += int(off.sum())
            if first is None:
                r = a + int(np.flatnonzero(off)[0])
                first = f"shard {s.index} {kind} row {r} has norm {n[r - a]:.4f}"
    return None, bad, first, labels


# Rows per block of the value check: a 1024-row float32 block (3 MB at d 768) stays in
# cache between its conversion and its norms.
CHECK_ROWS = 1024


def check_values(layout: Layout, block: int = CHECK_ROWS, progress=None, workers: int = 1,
                 assign=None) -> tuple[int, list | None]:
    """Stream every row once: NaN/inf are errors naming shard and row; rows that are not
    unit-norm give one warning (with a count) unless the layout renormalises.
    Zero rows cannot be renormalised and are errors when renormalising. Returns the
    number of non-unit rows, and with `assign` (see `_check_part`) each shard's labels
    (else None). `workers` threads check shards at once; the error raised is the first in
    shard order, as when checking one shard after another."""
    from concurrent.futures import ThreadPoolExecutor

    parts = [(s, kind) for s in layout.shards for kind in ("img_emb", "text_emb")]
    bad_norm, first = 0, None
    labels = [None] * len(layout.shards) if assign is not None else None
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        futures = [pool.submit(_check_part, layout, s, kind, block, assign if kind == "img_emb" else None)
                   for s, kind in parts]
        for (s, kind), fut in zip(parts, futures):
            err, bad, note, lab = fut.result()
            if err:
                raise BunnyError(err)
            bad_norm += bad
            first = first or note
            if lab is not None:
                labels[s.index] = lab
            if progress is not None:
                progress.update(s.rows)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if bad_norm and not layout.renormalize:
        warnings.warn(f"{bad_norm} embedding rows are not unit-norm (first: {first}); thresholds assume "
                      f"L2-normalised rows: pass --renormalize to normalise them", stacklevel=2)
    return bad_norm, labels
