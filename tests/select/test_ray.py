"""The Ray engine gives exactly the embedded engine's output: on a local Ray, on a joined
two-node cluster (`ray.cluster_utils.Cluster`, one CPU per node) through the command line with
the input named by URL, when a node dies mid-run (its task is retried on the other), and on
--resume after tasks failed for good. Bad addresses and bad input fail clearly."""
import gc
import os
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from bunny.errors import BunnyError
from bunny.select import engine
from bunny.select.engine import SelectConfig, select
from bunny.select.ray_engine import RayMap

FILES = ["selected.parquet", "stages/dedup.parquet", "stages/clip.parquet", "stages/centroid.parquet"]


def same_files(a, b):
    for f in FILES:
        assert pq.read_table(a / f).equals(pq.read_table(b / f)), f


def test_ray_equals_embedded(make_input, tmp_path, monkeypatch):
    """Both ways of assigning on Ray: on the driver while Ray starts (small inputs) and as Ray
    tasks; the second run uses the Ray this process is already connected to and leaves it."""
    import ray

    inp = make_input(shard_sizes=(150, 100, 110), seed=9)
    local = select(SelectConfig(input=str(inp), out=str(tmp_path / "l"), k=5, seed=2, n=8, progress=False))
    stages = []
    call = RayMap.__call__
    monkeypatch.setattr(RayMap, "__call__", lambda self, fn, args, desc, *a, **k: stages.append(desc) or
                        call(self, fn, args, desc, *a, **k))
    cfg = dict(input=str(inp), centroids=str(tmp_path / "l/centroids.npy"), seed=2, n=8, engine="ray", workers=2,
               cluster_batch=2, progress=False)
    fused = select(SelectConfig(out=str(tmp_path / "r1"), **cfg))  # starts a local Ray and stops it
    assert stages == ["step 1 (dedup)"] and fused["rows_after"] == local["rows_after"]
    same_files(tmp_path / "l", tmp_path / "r1")
    assert not ray.is_initialized()
    monkeypatch.setattr(engine, "FUSED_RAY_MAX_WORK", 0)
    stages.clear()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tasks = select(SelectConfig(out=str(tmp_path / "r2"), **cfg))
        assert stages == ["assign", "step 1 (dedup)"] and tasks["rows_after"] == local["rows_after"]
        same_files(tmp_path / "l", tmp_path / "r2")
        assert ray.is_initialized()  # not ours to stop
    finally:
        ray.shutdown()


def test_ray_bad_input_fails_before_any_output_and_stops_ray(tmp_path):
    """Ray starts while the value check runs: a bad row still fails with the shard and row
    named, nothing is written, and the local Ray is shut down."""
    import ray

    from selhelp import unit, write_layout

    rng = np.random.default_rng(0)
    img = unit(rng.normal(size=(12, 8)))
    img[5, 2] = np.nan
    inp = write_layout(tmp_path / "in", [unit(rng.normal(size=(6, 8))), img],
                       [unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(12, 8)))], dtype=np.float32)
    with pytest.raises(BunnyError, match=r"shard 1 img_emb row 5 \(gid 11\): NaN or infinite"):
        select(SelectConfig(input=str(inp), out=str(tmp_path / "o"), k=2, engine="ray", workers=2, progress=False))
    assert not (tmp_path / "o").exists()
    assert not ray.is_initialized()


def test_address_that_does_not_answer_is_a_clear_error(make_input, tmp_path):
    import socket

    inp = make_input()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address, message in ((f"127.0.0.1:{port}", "no Ray cluster answers there"), ("nohost", "expected HOST:PORT")):
        with pytest.raises(BunnyError, match=f"--address.*{message}"):
            select(SelectConfig(input=str(inp), out=str(tmp_path / "o"), k=2, engine="ray", address=address,
                                progress=False))
        assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def two_nodes():
    """A Ray cluster of two nodes with one CPU each, started outside the runs under test."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _alive_cpus(address) -> float:
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        return sum(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    finally:
        ray.shutdown()


def test_cli_on_two_nodes_with_a_url_input_equals_embedded_and_leaves_the_cluster(make_input, tmp_path,
                                                                                monkeypatch, two_nodes):
    from bunny.cli import main

    monkeypatch.setenv("BUNNY_SELECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engine, "FUSED_RAY_MAX_WORK", 0)  # assignment as Ray tasks too
    inp = make_input(shard_sizes=(160, 120, 140), seed=5)
    local = select(SelectConfig(input=str(inp), out=str(tmp_path / "l"), k=6, seed=4, n=12, progress=False))
    args = ["data", "select", "--input", f"file://{inp}", "--out", str(tmp_path / "r"), "--centroids",
            str(tmp_path / "l/centroids.npy"), "--seed", "4", "--n", "12", "--engine", "ray", "--address",
            two_nodes.address, "--workers", "2", "--no-progress"]
    assert main(args) == 0
    same_files(tmp_path / "l", tmp_path / "r")
    assert sorted(p.name.split("_", 1)[1] for p in (tmp_path / "cache").glob("*_img_emb_*.npy")) == [
        "img_emb_0000.npy", "img_emb_0001.npy", "img_emb_0002.npy"]  # read by the workers, through fsspec
    assert _alive_cpus(two_nodes.address) == 2  # the cluster we joined is still running


def test_without_address_a_ray_of_its_own_even_beside_a_running_cluster(make_input, tmp_path, two_nodes):
    """A cluster already runs on this machine (`two_nodes`): without --address the run starts
    (and stops) a Ray of its own rather than joining it, and gives the embedded engine's files."""
    inp = make_input(shard_sizes=(120, 100), seed=2)
    local = select(SelectConfig(input=str(inp), out=str(tmp_path / "l"), k=4, seed=1, n=7, progress=False))
    select(SelectConfig(input=str(inp), out=str(tmp_path / "r"), centroids=str(tmp_path / "l/centroids.npy"), seed=1,
                        n=7, engine="ray", workers=2, progress=False))
    same_files(tmp_path / "l", tmp_path / "r")
    assert _alive_cpus(two_nodes.address) == 2
    assert local["rows_after"]["input"] == 220


def _task_on_node(node_id: str, marker: str, run_clusters):
    """A step-1 task that, on `node_id`, signals through `marker` and then waits to be killed
    (defined here: Ray pickles it by value)."""

    def task(*args):
        import pathlib
        import time

        import ray

        if ray.get_runtime_context().get_node_id() == node_id:
            pathlib.Path(marker).touch()
            time.sleep(120)
        return run_clusters(*args)

    return task


def test_a_node_dying_mid_run_is_retried_on_the_other(make_input, tmp_path, monkeypatch, two_nodes):
    inp = make_input(shard_sizes=(160, 120, 140), seed=7)
    local = select(SelectConfig(input=str(inp), out=str(tmp_path / "l"), k=6, seed=1, n=10, progress=False))
    node = two_nodes.list_all_nodes()[-1]  # the second (not the head)
    marker = tmp_path / "started"
    monkeypatch.setattr(engine, "run_clusters", _task_on_node(node.node_id, str(marker), engine.run_clusters))
    result = {}

    def run():
        try:
            result["report"] = select(SelectConfig(input=str(inp), out=str(tmp_path / "r"), seed=1, n=10,
                                                   centroids=str(tmp_path / "l/centroids.npy"), engine="ray",
                                                   address=two_nodes.address, workers=2, cluster_batch=1,
                                                   progress=False))
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), result
    two_nodes.remove_node(node, allow_graceful=False)
    t.join(timeout=240)
    assert "error" not in result, result.get("error")
    assert result["report"]["rows_after"] == local["rows_after"]
    same_files(tmp_path / "l", tmp_path / "r")
    two_nodes.add_node(num_cpus=1)  # back to two nodes for the other tests
    two_nodes.wait_for_nodes()


def _object_refs_reachable_from(error: BaseException) -> list:
    """The Ray object refs held by the frames of `error`'s tracebacks (and its causes')."""
    import ray

    found, errors = [], [error]
    while errors:
        e = errors.pop()
        if e is None:
            continue
        tb = e.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple, set)) \
                    else [value]
                found += [v for v in items if isinstance(v, ray.ObjectRef)]
            tb = tb.tb_next
        errors += [e.__cause__, e.__context__]
    return found


def _crashing(cluster_id: int, run_clusters):
    def task(layout, work, ids, centroids, p):
        import os

        if cluster_id in [int(c) for c in ids]:
            os._exit(3)  # the worker process dies, every time
        return run_clusters(layout, work, ids, centroids, p)

    return task


def test_tasks_that_keep_dying_fail_naming_resume_and_resume_gives_the_output(make_input, tmp_path, monkeypatch,
                                                                            two_nodes):
    inp = make_input(shard_sizes=(150, 130), seed=8)
    local = select(SelectConfig(input=str(inp), out=str(tmp_path / "l"), k=5, seed=3, n=9, progress=False))
    cfg = dict(input=str(inp), out=str(tmp_path / "r"), seed=3, n=9, centroids=str(tmp_path / "l/centroids.npy"),
               engine="ray", address=two_nodes.address, workers=2, cluster_batch=1, progress=False)
    real = engine.run_clusters
    monkeypatch.setattr(engine, "run_clusters", _crashing(2, real))
    with pytest.raises(BunnyError, match="worker or node died.*--resume") as failed:
        select(SelectConfig(**cfg))
    # the driver has disconnected: a Ray object ref freed from now on would end this process
    assert not _object_refs_reachable_from(failed.value)
    del failed
    gc.collect()
    assert os.listdir(tmp_path / "r/_work/clusters")  # the clusters finished are kept
    monkeypatch.setattr(engine, "run_clusters", real)
    select(SelectConfig(**cfg, resume=True))
    same_files(tmp_path / "l", tmp_path / "r")
