"""The embedded engine end to end against the reference path (`bunny.select.reference`), resume, workers."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from bunny.select import kernel, processes
from bunny.select.engine import SelectConfig, select
from selhelp import oracle, unit, write_layout

FILES = ["selected.parquet", "stages/dedup.parquet", "stages/clip.parquet", "stages/centroid.parquet"]


def run(inp, out, **kw):
    kw.setdefault("progress", False)
    return select(SelectConfig(input=str(inp), out=str(out), **kw))


def tables(out):
    return {f: pq.read_table(out / f).to_pandas() for f in FILES}


def test_matches_oracle_and_writes_layout(make_input, tmp_path):
    inp = make_input()
    rep = run(inp, tmp_path / "out", k=4, seed=1, threshold=0.8, n=5)
    out = tmp_path / "out"
    c = np.load(out / "centroids.npy")
    want = oracle(inp, c, threshold=0.8, n=5, seed=1)
    t = tables(out)
    for name, f in zip(["selected", "dedup", "clip", "centroid"], FILES):
        assert t[f]["gid"].tolist() == want[name].tolist(), name
        assert t[f]["gid"].is_monotonic_increasing
    sel = t["selected.parquet"]
    assert list(sel.columns[:7]) == ["gid", "key", "shard", "row", "cluster", "clip_score", "centroid_cos"]
    assert (sel["key"] == [f"key{g}" for g in sel["gid"]]).all()
    assert (sel["cluster"].values == want["cluster"][sel["gid"].values]).all()
    offs = np.array([0, 120, 200])
    assert (offs[sel["shard"]] + sel["row"] == sel["gid"]).all()
    assert rep["rows_after"] == json.loads((out / "report.json").read_text())["rows_after"]
    assert rep["rows_after"]["selected"] == 5 and rep["rows_after"]["dedup"] < 300


def test_given_centroids_semdedup_and_skewed_cluster(tmp_path):
    rng = np.random.default_rng(2)
    d = 16
    big = unit(np.r_[[[1.0] + [0] * 15]] + 0.1 * rng.normal(size=(400, d)))  # one big cluster
    small = unit(-np.eye(d)[1] + 0.1 * rng.normal(size=(20, d)))
    x = np.r_[big, small]
    t = unit(x + rng.normal(size=x.shape))
    inp = write_layout(tmp_path / "in", [x[:250], x[250:]], [t[:250], t[250:]])
    c = np.stack([np.eye(d)[0], -np.eye(d)[1], np.eye(d)[5] * 3]).astype(np.float32)  # one empty cluster
    np.save(tmp_path / "c.npy", c)
    rep = run(inp, tmp_path / "o", centroids=str(tmp_path / "c.npy"))
    assert np.load(tmp_path / "o/cluster_sizes.npy").tolist() == [400, 20, 0]
    want = oracle(inp, c)
    assert tables(tmp_path / "o")["selected.parquet"]["gid"].tolist() == want["selected"].tolist()
    rep2 = run(inp, tmp_path / "s", centroids=str(tmp_path / "c.npy"), mode="semdedup", eps=0.1)
    assert rep2["rows_after"]["dedup"] != rep["rows_after"]["dedup"]


def test_workers_and_batching_do_not_change_output(make_input, tmp_path):
    inp = make_input(shard_sizes=(90, 60, 50, 100), seed=4)
    run(inp, tmp_path / "a", k=6, seed=0, n=20, workers=1)
    run(inp, tmp_path / "b", centroids=str(tmp_path / "a/centroids.npy"), n=20, workers=2, cluster_batch=1)
    ta, tb = tables(tmp_path / "a"), tables(tmp_path / "b")
    for f in FILES:
        assert ta[f].equals(tb[f]), f


def test_default_workers_one_per_core_and_blas_threads_restored(make_input, tmp_path):
    """workers=0 (the default) runs one cluster per available core, each with C // W BLAS
    threads; the caller's BLAS thread count is back afterwards."""
    from threadpoolctl import threadpool_info

    from bunny.select.engine import available_cores

    import faiss  # noqa: F401  (loads its own OpenBLAS: count it before, as after the run)

    before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    rep = run(make_input(seed=6), tmp_path / "o", k=4, seed=1)
    assert rep["workers"] == available_cores()
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == before
    with pytest.raises(Exception, match=r"--workers -1: must be >= 1 \(or 0 for one per core\)"):
        run(make_input(seed=6), tmp_path / "bad", k=4, workers=-1)


def test_resume_after_kill(make_input, tmp_path, monkeypatch):
    inp = make_input(seed=5)
    run(inp, tmp_path / "ref", k=5, seed=3, n=30)
    real, calls = kernel.run_cluster, []

    def dying(layout, work, c, centroid, p):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        calls.append(c)
        return real(layout, work, c, centroid, p)

    monkeypatch.setattr(kernel, "run_cluster", dying)
    # the kill counts calls in this process: step 1 in threads (a dead worker process:
    # test_processes.py)
    monkeypatch.setattr(processes, "available", lambda: False)
    with pytest.raises(KeyboardInterrupt):
        run(inp, tmp_path / "out", k=5, seed=3, n=30)
    monkeypatch.setattr(kernel, "run_cluster", real)
    done = sorted((tmp_path / "out/_work/clusters").glob("c_*.npz"))
    assert len(done) == 3 and not list((tmp_path / "out/_work/clusters").glob(".*tmp"))
    stamps = {p: p.stat().st_mtime_ns for p in done}
    with pytest.raises(Exception, match="not empty"):
        run(inp, tmp_path / "out", k=5, seed=3, n=30)
    with pytest.raises(Exception, match="different parameters"):
        run(inp, tmp_path / "out", k=5, seed=3, n=31, resume=True)
    run(inp, tmp_path / "out", k=5, seed=3, n=30, resume=True)
    assert all(p.stat().st_mtime_ns == s for p, s in stamps.items())  # finished clusters not redone
    ta, tb = tables(tmp_path / "ref"), tables(tmp_path / "out")
    for f in FILES:
        assert ta[f].equals(tb[f]), f


def test_stored_gather_converts_like_gather_f32(tmp_path):
    """The step-1 kernel gathers a cluster's stored rows (`gather_stored`), finds identical
    ones there and converts only the distinct rows (`stored_to_f32`): the float32 values
    must be `gather_f32`'s, bit for bit, for float16 and float32 shards mixed, with and
    without renormalisation; and rows are identical in storage exactly when their float32
    values are."""
    from bunny.select import rules
    from bunny.select.layout import open_layout

    rng = np.random.default_rng(3)
    a = rng.normal(size=(40, 16)).astype(np.float16)
    a[5] = a[9]  # identical within a shard
    b = rng.normal(size=(30, 16)).astype(np.float32)
    b[2] = a[5].astype(np.float32)  # identical across shards of different stored dtypes
    write_layout(tmp_path / "in", [a], [a])
    np.save(tmp_path / "in/img_emb/img_emb_0001.npy", b)
    np.save(tmp_path / "in/text_emb/text_emb_0001.npy", b)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": [f"k{i}" for i in range(30)]}), tmp_path / "in/metadata/metadata_0001.parquet")
    for renorm in (False, True):
        lay = open_layout(tmp_path / "in", renorm)
        parts = [(lay.shards[0], np.array([9, 1, 5, 30 - 1])), (lay.shards[1], np.array([2, 0, 7]))]
        want = lay.gather_f32(lay.img, parts)
        raw = lay.gather_stored(lay.img, parts)
        assert raw.dtype == np.float32  # one part is float32: all are promoted
        first, inverse = rules.collapse_identical(raw)
        got = lay.stored_to_f32(raw, first, chunk=2)
        assert np.array_equal(got[inverse], want)
        assert len(first) == len(rules.collapse_identical(want)[0]) == 5  # rows 9, 5 and b[2] are one
        f16 = lay.gather_stored(lay.img, parts[:1])
        assert f16.dtype == np.float16 and np.array_equal(f16, a[[9, 1, 5, 29]])


def test_survivor_scores_in_chunks_across_shards(tmp_path):
    """Step 1 reads the survivors' text rows a chunk at a time (`kernel._scores`); chunks
    that straddle shards give the scores of the whole gathered matrix, bit for bit."""
    from bunny.select import kernel, rules
    from bunny.select.layout import open_layout

    rng = np.random.default_rng(11)
    img = [rng.normal(size=(n, 8)).astype(np.float16) for n in (7, 5, 9)]
    txt = [rng.normal(size=(n, 8)).astype(np.float16) for n in (7, 5, 9)]
    lay = open_layout(write_layout(tmp_path / "in", img, txt), False)
    parts = [(lay.shards[0], np.array([1, 4, 6])), (lay.shards[1], np.array([0, 3])),
             (lay.shards[2], np.array([2, 5, 7, 8]))]
    x = lay.gather_f32(lay.img, parts)
    first, inverse = rules.collapse_identical(x)
    rows = rules.Distinct(x[first], first, inverse)
    kept = np.array([0, 2, 3, 4, 6, 8])
    c = rng.normal(size=8).astype(np.float32)
    t_all = lay.gather_f32(lay.txt, parts)
    want = rules.clip_and_cosine(x, t_all[kept], c, kept)
    for chunk in (1, 2, 4, 100):
        got = kernel._scores(lay, parts, kept, rows, c, chunk=chunk)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_assignment_during_the_check_equals_its_own_pass(make_input, tmp_path, monkeypatch):
    """With centroids known before the value check, the embedded engine assigns rows while
    checking them; with the fusion switched off, assignment is a pass of its own. Same
    assignment files and outputs, also when rows are renormalised on the way."""
    from bunny.select import engine

    inp = make_input(shard_sizes=(90, 60, 50), seed=9)
    run(inp, tmp_path / "k", k=5, seed=2)  # k-means: its own pass; fit the centroids once
    cen = str(tmp_path / "k/centroids.npy")
    calls = []
    monkeypatch.setattr(engine, "assign_shard", lambda *a: calls.append(a[1]) or kernel.assign_shard(*a))
    for renorm in (False, True):
        got = {}
        for fused in (True, False):
            monkeypatch.setattr(engine, "FUSED_ASSIGN_MAX_ROWS", 1 << 26 if fused else 0)
            out = tmp_path / f"o{renorm}{fused}"
            calls.clear()
            run(inp, out, centroids=cen, renormalize=renorm)
            assert calls == ([] if fused else [0, 1, 2])
            got[fused] = (tables(out), {p.name: np.load(p) for p in sorted((out / "_work/assign").glob("*.npy"))})
        assert got[True][1].keys() == got[False][1].keys() and len(got[True][1]) == 6
        for name in got[True][1]:
            assert np.array_equal(got[True][1][name], got[False][1][name]), name
        for f in FILES:
            assert got[True][0][f].equals(got[False][0][f]), f


def test_take_strings_matches_arrow_take():
    """The key gather of the output writer (numpy on the string buffers) equals pyarrow's
    `take`: sliced arrays, empty and non-ASCII strings, repeated and unsorted indices; nulls
    and large strings go through `take` itself."""
    import pyarrow as pa

    from bunny.select.output import take_strings

    col = pa.array(["a", "", "bé", "ccc", "", "dddd", "ü∞", "e"], pa.string())
    for arr in (col, col.slice(2), col.slice(1, 5)):
        for idx in ([], [0], [len(arr) - 1, 0, 0], list(range(len(arr)))[::-1]):
            got = take_strings(arr, np.array(idx, np.int64))
            assert got.equals(arr.take(pa.array(idx, pa.int64()))), (arr, idx)
    with_null = pa.array(["x", None, "y"], pa.string())
    assert take_strings(with_null, np.array([1, 2])).to_pylist() == [None, "y"]
    large = pa.array(["x", "yy"], pa.large_string())
    assert take_strings(large, np.array([1])).to_pylist() == ["yy"]
