"""Step 1 in forked worker processes (forked.py): the same output as threads, errors and
dead workers reported, and a run whose worker died resumes to the same result."""
import os

import pytest

from bunny.errors import BunnyError
from bunny.select import forked, kernel
from test_engine import FILES, run, tables

pytestmark = pytest.mark.skipif(not forked.available(), reason="fork: Linux only")


def test_step1_runs_in_worker_processes_with_the_threads_output(make_input, tmp_path, monkeypatch):
    inp = make_input(shard_sizes=(300, 260, 280), d=32, seed=4)
    pids = tmp_path / "pids"
    pids.mkdir()
    real = kernel.run_cluster

    def recording(layout, work, c, centroid, p):
        (pids / f"{c}_{os.getpid()}").touch()
        return real(layout, work, c, centroid, p)

    monkeypatch.setattr(kernel, "run_cluster", recording)
    run(inp, tmp_path / "procs", k=6, seed=2, n=50, workers=2)
    seen = {int(f.name.split("_")[1]) for f in pids.iterdir()}
    assert len(list(pids.iterdir())) == 6 and os.getpid() not in seen and 1 <= len(seen) <= 2
    for f in pids.iterdir():
        f.unlink()
    run(inp, tmp_path / "threads", k=6, seed=2, n=50, workers=2, fork=False)  # --no-fork
    assert {int(f.name.split("_")[1]) for f in pids.iterdir()} == {os.getpid()}
    ta, tb = tables(tmp_path / "procs"), tables(tmp_path / "threads")
    for f in FILES:
        assert ta[f].equals(tb[f]), f


def test_a_dead_worker_is_an_error_and_the_run_resumes(make_input, tmp_path, monkeypatch):
    inp = make_input(seed=6)
    run(inp, tmp_path / "ref", k=5, seed=1, n=30, workers=2)
    real = kernel.run_cluster

    def dying(layout, work, c, centroid, p):
        if c == 3:
            os._exit(9)  # as a worker killed by the OOM killer
        return real(layout, work, c, centroid, p)

    monkeypatch.setattr(kernel, "run_cluster", dying)
    with pytest.raises(BunnyError, match="worker process died.*--resume"):
        run(inp, tmp_path / "out", k=5, seed=1, n=30, workers=2)
    assert forked._TASKS is None
    monkeypatch.setattr(kernel, "run_cluster", real)
    # the pool stops the other worker too, possibly mid-write: its temporary file is removed
    assert not list((tmp_path / "out/_work/clusters").glob(".*tmp"))
    run(inp, tmp_path / "out", k=5, seed=1, n=30, workers=2, resume=True)
    ta, tb = tables(tmp_path / "ref"), tables(tmp_path / "out")
    for f in FILES:
        assert ta[f].equals(tb[f]), f


def test_stale_temporary_files_are_removed_before_step1(make_input, tmp_path):
    """A run killed mid-write (SIGKILL: no cleanup) leaves a temporary file; --resume removes it."""
    inp = make_input(seed=8)
    run(inp, tmp_path / "ref", k=4, seed=1)
    (tmp_path / "ref/_work/clusters/.c_0000009.npz.1234.tmp").write_bytes(b"partial")
    (tmp_path / "ref/_work/assign/.order_0000.npy.1234.tmp").write_bytes(b"partial")
    kernel.cluster_file(tmp_path / "ref/_work", 2).unlink()  # as if cluster 2 was being written
    run(inp, tmp_path / "ref", k=4, seed=1, resume=True)
    assert not list((tmp_path / "ref/_work").glob("*/.*tmp"))
    assert kernel.cluster_file(tmp_path / "ref/_work", 2).exists()


def _task(i):
    if i == 2:
        raise BunnyError(f"cluster {i}: bad")
    return i * i


def test_fork_map_returns_in_order_and_raises_a_task_error():
    m = forked.ForkMap(2)
    assert m(_task, [(i,) for i in (0, 1, 3, 4)], "t", False) == [0, 1, 9, 16]
    with pytest.raises(BunnyError, match="cluster 2: bad"):
        m(_task, [(i,) for i in range(5)], "t", False)
    assert forked._TASKS is None


def test_cli_no_fork_keeps_step1_in_threads(make_input, tmp_path, monkeypatch):
    from bunny.cli import main

    inp = make_input(seed=7)
    used = []
    call = forked.ForkMap.__call__
    monkeypatch.setattr(forked.ForkMap, "__call__", lambda self, *a, **k: used.append(1) or call(self, *a, **k))
    args = ["data", "select", "--input", str(inp), "--k", "3", "--workers", "2", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a"), "--no-fork"]) == 0 and used == []
    assert main(args + ["--out", str(tmp_path / "b")]) == 0 and used == [1]
    ta, tb = tables(tmp_path / "a"), tables(tmp_path / "b")
    for f in FILES:
        assert ta[f].equals(tb[f]), f


# ForkCall: Ray's value check in a forked child (engine._ray_during_check)

def test_fork_call_runs_in_a_child_and_returns_its_value():
    call = forked.ForkCall(lambda a, b: (os.getpid(), a + b), 2, 3, desc="value check")
    pid, total = call.result()
    assert pid != os.getpid() and total == 5
    assert forked._CALL is None


def test_fork_call_raises_the_childs_error_and_reissues_its_warnings():
    import warnings

    def warn_then(fail):
        warnings.warn("17 embedding rows are not unit-norm", UserWarning)
        if fail:
            raise BunnyError("shard 1 img_emb row 5 (gid 11): NaN or infinite values")
        return "ok"

    with pytest.warns(UserWarning, match="17 embedding rows are not unit-norm"):
        assert forked.ForkCall(warn_then, False, desc="value check").result() == "ok"
    with pytest.raises(BunnyError, match=r"row 5 \(gid 11\)"):
        forked.ForkCall(warn_then, True, desc="value check").result()


def test_fork_call_child_death_is_an_error():
    import signal

    call = forked.ForkCall(lambda: os.kill(os.getpid(), signal.SIGKILL), desc="value check")
    with pytest.raises(BunnyError, match="value check: its worker process died"):
        call.result()


def test_fused_assignment_in_a_child_forked_after_openmp_started():
    """The parent's faiss search on 2 OpenMP threads starts GNU OpenMP's pool; a child forked
    afterwards assigns with one thread per search (what _fork_check allows) and finishes."""
    import numpy as np

    from bunny.select.assign import Assigner

    rng = np.random.default_rng(0)
    c = rng.standard_normal((40, 64)).astype(np.float32)
    x = rng.standard_normal((5000, 64)).astype(np.float32)
    want = Assigner(c, 2)(x)
    call = forked.ForkCall(lambda: Assigner(c, 1)(x), desc="value check")
    got = call.future.result(timeout=120)[0]  # a hang fails here instead of blocking the suite
    call.result()
    assert np.array_equal(got, want)


def test_fork_check_only_where_safe(monkeypatch):
    import sys
    import types

    from bunny.select import engine

    one, two = types.SimpleNamespace(threads=1), types.SimpleNamespace(threads=2)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    assert engine._fork_check(True, None) and engine._fork_check(True, one)
    assert not engine._fork_check(False, one)  # --no-fork
    assert not engine._fork_check(True, two)  # faiss on several OpenMP threads in the child
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True))
    assert not engine._fork_check(True, one)  # this process is connected to Ray


def test_fork_call_child_runs_at_the_given_niceness():
    base = os.nice(0)
    assert forked.ForkCall(lambda: os.nice(0), desc="value check", nice=5).result() == min(19, base + 5)
    assert os.nice(0) == base  # the parent's own niceness is untouched
