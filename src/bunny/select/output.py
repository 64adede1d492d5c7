"""Steps 2-4 and the output folder, computed by streaming the per-cluster survivor files
(written by the kernel) a few times; shared by every engine, so outputs are identical."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bunny.atomic import atomic_files, atomic_write
from bunny.select import rules
from bunny.select.kernel import atomic_save, cluster_file
from bunny.select.layout import Layout
from bunny.select.windows import Window

CHUNK = 1 << 20  # survivor rows per streamed chunk
BUCKET = 1 << 23  # gids per output bucket: bounds memory while sorting by gid
HIST_BINS = np.linspace(-1.0, 1.0, 401)


def _cluster_chunks(work: Path, k: int, progress: str | None = None):
    """Dicts of arrays (gid, clip, cos, cluster) read from the per-cluster files, ~CHUNK rows each."""
    buf, rows = [], 0
    it = range(k) if progress is None else tqdm(range(k), desc=progress, leave=False, unit="cluster")
    for c in it:
        z = np.load(cluster_file(work, c))
        buf.append((z["gid"], z["clip"], z["cos"], np.full(len(z["gid"]), c, np.int32)))
        rows += len(z["gid"])
        if rows >= CHUNK:
            yield _join(buf)
            buf, rows = [], 0
    if buf:
        yield _join(buf)


def compact(work: Path, k: int, progress: str | None = None) -> int:
    """Copy the step-1 survivors of all clusters into a few CHUNK-row files
    (_work/survivors/), so the passes of steps 2-4 read a few large files instead of one
    small file per cluster. Returns the number of survivors."""
    import shutil

    d = work / "survivors"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    n = 0
    for i, ch in enumerate(_cluster_chunks(work, k, progress)):
        atomic_save(d / f"chunk_{i:06d}.npz", **ch)
        n += len(ch["gid"])
    write_json(d / "done.json", {"k": k, "rows": n})  # last: marks the copy complete
    return n


def survivor_chunks(work: Path, k: int, progress: str | None = None):
    """Yield dicts of arrays (gid, clip, cos, cluster) over all clusters, ~CHUNK rows each
    (from the compacted copy when there is one)."""
    d = work / "survivors"
    done = d / "done.json"
    if not (done.exists() and json.loads(done.read_text())["k"] == k):
        yield from _cluster_chunks(work, k, progress)
        return
    files = sorted(d.glob("chunk_*.npz"))
    for f in (files if progress is None else tqdm(files, desc=progress, leave=False, unit="chunk")):
        z = np.load(f)
        yield {name: z[name] for name in ("gid", "clip", "cos", "cluster")}


def _join(buf):
    return {name: np.concatenate([b[i] for b in buf]) for i, name in enumerate(("gid", "clip", "cos", "cluster"))}


class Steps:
    """The global windows (steps 2, 3) and the draw (step 4) over the step-1 survivors."""

    def __init__(self, work: Path, k: int, clip_window, centroid_window, n, seed: int, show: bool):
        self.work, self.k, self.seed = work, k, seed
        self.show = show
        self.n1 = compact(work, k, "collect survivors" if show else None)
        self.w2 = Window(self._stream(2), (32, 64), self.n1, *rules.window(self.n1, *clip_window))
        n2 = self.w2.kept
        self.w3 = Window(self._stream(3), (32, 64), n2, *rules.window(n2, *centroid_window))
        n3 = self.w3.kept
        self.w4 = Window(self._stream(4), (64, 64), n3, 0, n3 if n is None else min(n, n3))

    def masks(self, ch):
        """Step-2, step-3 and selected masks of one chunk."""
        m2 = self.w2.mask((rules.desc_key(ch["clip"]), ch["gid"].astype(np.uint64)))
        m3 = m2.copy()
        m3[m2] = self.w3.mask((rules.desc_key(ch["cos"][m2]), ch["gid"][m2].astype(np.uint64)))
        m4 = m3.copy()
        m4[m3] = self.w4.mask((rules.draw_hash(ch["gid"][m3], self.seed), ch["gid"][m3].astype(np.uint64)))
        return m2, m3, m4

    def _stream(self, step):
        def stream():
            for ch in survivor_chunks(self.work, self.k, f"step {step} pass" if self.show else None):
                g = ch["gid"].astype(np.uint64)
                if step == 2:
                    yield rules.desc_key(ch["clip"]), g
                    continue
                m2 = self.w2.mask((rules.desc_key(ch["clip"]), g))
                if step == 3:
                    yield rules.desc_key(ch["cos"][m2]), g[m2]
                    continue
                m3 = self.w3.mask((rules.desc_key(ch["cos"][m2]), g[m2]))
                yield rules.draw_hash(ch["gid"][m2][m3], self.seed), g[m2][m3]
        return stream


_COLS = ("gid", "key", "shard", "row", "cluster", "clip_score", "centroid_cos")
STAGE_FILES = {"dedup": "stages/dedup.parquet", "clip": "stages/clip.parquet",
               "centroid": "stages/centroid.parquet", "selected": "selected.parquet"}


def _arrow(a: np.ndarray):
    """A pyarrow array over a 1-d numeric numpy array's buffer. `pa.array` would import
    pandas on first use (to check for pandas types)."""
    import pyarrow as pa

    a = np.ascontiguousarray(a)
    return pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype), len(a), [None, pa.py_buffer(a)])


class KeyPrefetch:
    """Reads the shards' key columns in shard order in a background thread, at most
    `max_rows` keys ahead of the one being used, so the reading overlaps steps 2-4 and the
    writing (one core each). `get(s)` must be called with increasing s."""

    def __init__(self, layout: Layout, max_rows: int = 1 << 21):
        from concurrent.futures import ThreadPoolExecutor

        self.layout, self.max_rows = layout, max_rows
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="select-keys")
        self.pending: dict = {}  # shard -> future
        self.next = 0
        self._fill(0)

    def _fill(self, current: int) -> None:
        ahead = sum(self.layout.shards[s].rows for s in self.pending if s > current)
        while self.next < len(self.layout.shards) and (self.next <= current or ahead < self.max_rows):
            self.pending[self.next] = self.pool.submit(self.layout.key_column, self.next)
            if self.next > current:
                ahead += self.layout.shards[self.next].rows
            self.next += 1

    def get(self, s: int):
        for old in [t for t in self.pending if t < s]:  # shards with no survivors: not needed
            self.pending.pop(old).cancel()
        self._fill(s)
        col = self.pending.pop(s).result()
        self._fill(s)
        return col

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pool.shutdown(wait=True)


def take_strings(col, idx: np.ndarray):
    """col.take(idx) for a pyarrow string array, gathered with numpy from its offsets and
    bytes: `Array.take` imports pyarrow.compute on first use.
    Arrays with nulls, or results over 2 GB, go through `take`."""
    import pyarrow as pa

    idx = np.asarray(idx, np.int64)
    bufs = col.buffers()
    if col.null_count or col.type != pa.string():
        return col.take(_arrow(idx))
    off = np.frombuffer(bufs[1], np.int32)[col.offset:col.offset + len(col) + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    starts = off[idx].astype(np.int64)
    lens = off[idx + 1].astype(np.int64) - starts
    new_off = np.zeros(len(idx) + 1, np.int64)
    np.cumsum(lens, out=new_off[1:])
    if new_off[-1] >= 2 ** 31:
        return col.take(_arrow(idx))
    new_data = data[np.repeat(starts - new_off[:-1], lens) + np.arange(new_off[-1])]
    return pa.Array.from_buffers(pa.string(), len(idx), [None, pa.py_buffer(new_off.astype(np.int32)),
                                                         pa.py_buffer(new_data)])


def write_outputs(layout: Layout, out: Path, work: Path, k: int, steps: Steps, show: bool,
                  keys: KeyPrefetch) -> dict:
    """Write the four gid-sorted parquet files (bucket by bucket of gids) and return the
    row counts and score histograms for report.json. `keys`: the key columns' prefetcher,
    started by the caller before steps 2-4 (closed here)."""
    try:
        return _write_outputs(layout, out, work, k, steps, show, keys)
    finally:
        keys.close()


def _write_outputs(layout: Layout, out: Path, work: Path, k: int, steps: Steps, show: bool, prefetch: KeyPrefetch) -> dict:
    """The four files, each written to a temporary name and renamed into place together at
    the end (`bunny.atomic`)."""
    with atomic_files(*(out / rel for rel in STAGE_FILES.values())) as tmps:
        return _write_tables(layout, work, k, steps, show, prefetch, dict(zip(STAGE_FILES, tmps)))


def _write_tables(layout: Layout, work: Path, k: int, steps: Steps, show: bool, prefetch: KeyPrefetch,
                  tmp: dict) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("gid", pa.int64()), ("key", pa.string()), ("shard", pa.int32()), ("row", pa.int64()),
                        ("cluster", pa.int32()), ("clip_score", pa.float32()), ("centroid_cos", pa.float32())])
    schema_nokey = pa.schema([f for f in schema if f.name != "key"])
    # dictionary encoding only where values repeat: on the unique gids, keys and scores it
    # is tried and given up on every page (10x the writing time, larger files)
    writers = {name: pq.ParquetWriter(p, schema, use_dictionary=["shard", "cluster"]) for name, p in tmp.items()}
    counts = dict.fromkeys(STAGE_FILES, 0)
    hist_clip = np.zeros(len(HIST_BINS) - 1, np.int64)
    hist_cos = np.zeros(len(HIST_BINS) - 1, np.int64)
    offsets = layout.offsets()
    key_cache: dict[int, np.ndarray] = {}
    buckets = range(0, max(layout.rows, 1), BUCKET)
    for g0 in (tqdm(buckets, desc="write outputs", unit="bucket") if show else buckets):
        parts = [{n: a[(ch["gid"] >= g0) & (ch["gid"] < g0 + BUCKET)] for n, a in ch.items()}
                 for ch in survivor_chunks(work, k)]
        ch = {n: np.concatenate([p[n] for p in parts]) for n in ("gid", "clip", "cos", "cluster")}
        if not len(ch["gid"]):
            continue
        order = np.argsort(ch["gid"], kind="stable")
        ch = {n: a[order] for n, a in ch.items()}
        shard = (np.searchsorted(offsets, ch["gid"], side="right") - 1).astype(np.int32)
        row = ch["gid"] - offsets[shard]
        # rows are in gid order, so each shard's rows are one contiguous run
        runs = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1], True])
        key_parts = []
        for a, b in zip(runs[:-1], runs[1:]):
            s = int(shard[a])
            if s not in key_cache:
                key_cache.clear()  # buckets go in gid order: one shard's keys at a time
                key_cache[s] = prefetch.get(s)
            key_parts.append(take_strings(key_cache[s], row[a:b]))
        keys = pa.concat_arrays(key_parts)
        masks = dict(zip(("clip", "centroid", "selected"), steps.masks(ch)))
        masks["dedup"] = np.ones(len(row), dtype=bool)
        hist_clip += np.histogram(ch["clip"], HIST_BINS)[0]
        hist_cos += np.histogram(ch["cos"][masks["clip"]], HIST_BINS)[0]
        for name, m in masks.items():
            take = np.flatnonzero(m)
            table = pa.Table.from_arrays([_arrow(a[take]) for a in (ch["gid"], shard, row, ch["cluster"], ch["clip"],
                                                                    ch["cos"])], schema=schema_nokey)
            table = table.add_column(1, schema.field("key"), take_strings(keys, take))
            writers[name].write_table(table)
            counts[name] += int(m.sum())
    for w in writers.values():
        w.close()
    return {"counts": counts, "hist_bins": HIST_BINS.tolist(), "hist_clip": hist_clip.tolist(),
            "hist_centroid_cos": hist_cos.tolist()}


def window_scores(steps: Steps) -> dict:
    """The score at each window edge (for plots): first kept and first dropped-after."""
    def score(key):
        if key is None:
            return None
        asc = 0xFFFFFFFF - key[0]
        bits = asc & 0x7FFFFFFF if asc >> 31 else (~asc) & 0xFFFFFFFF
        return float(np.array([bits], np.uint32).view(np.float32)[0])
    return {"clip": [score(steps.w2.lo), score(steps.w2.hi)],
            "centroid": [score(steps.w3.lo), score(steps.w3.hi)]}


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))
