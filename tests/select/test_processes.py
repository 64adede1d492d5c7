"""Step 1 in worker processes (processes.py): the same output as threads, errors and dead
workers reported, and a run whose worker died resumes to the same result."""
import os

import pytest

from bunny.errors import BunnyError
from bunny.select import kernel, processes
from test_engine import FILES, run, tables

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


def test_process_map_returns_in_order_and_raises_a_task_error():
    m = processes.ProcessMap(2)
    assert m(_task, [(i,) for i in (0, 1, 3, 4)], "t", False) == [0, 1, 9, 16]
    with pytest.raises(BunnyError, match="cluster 2: bad"):
        m(_task, [(i,) for i in range(5)], "t", False)


def test_cli_no_fork_keeps_step1_in_threads(make_input, tmp_path, monkeypatch):
    from bunny.cli import main

    inp = make_input(seed=7)
    used = []
    call = processes.ProcessMap.__call__
    monkeypatch.setattr(processes.ProcessMap, "__call__", lambda self, *a, **k: used.append(1) or call(self, *a, **k))
    args = ["data", "select", "--input", str(inp), "--k", "3", "--workers", "2", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a"), "--no-fork"]) == 0 and used == []
    assert main(args + ["--out", str(tmp_path / "b")]) == 0 and used == [1]
    ta, tb = tables(tmp_path / "a"), tables(tmp_path / "b")
    for f in FILES:
        assert ta[f].equals(tb[f]), f
