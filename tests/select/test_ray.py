"""The Ray engine on a local Ray gives exactly the embedded engine's output (one module,
one Ray start: Ray startup is slow)."""
import pyarrow.parquet as pq

from bunny.select.engine import SelectConfig, select

FILES = ["selected.parquet", "stages/dedup.parquet", "stages/clip.parquet", "stages/centroid.parquet"]


def test_ray_equals_embedded(make_input, tmp_path, monkeypatch):
    """Both ways of assigning on Ray: on the driver during Ray's start (small inputs) and as
    Ray tasks; one Ray instance for both runs (the engine leaves a Ray it did not start)."""
    import ray as ray_mod

    from bunny.select import engine
    from bunny.select.ray_engine import RayMap

    inp = make_input(shard_sizes=(150, 100, 110), seed=9)
    local = select(SelectConfig(input=str(inp), out=str(tmp_path / "l"), k=5, seed=2, n=8, progress=False))
    stages = []
    call = RayMap.__call__
    monkeypatch.setattr(RayMap, "__call__", lambda self, fn, args, desc, *a, **k: stages.append(desc) or
                        call(self, fn, args, desc, *a, **k))
    ray_mod.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for fused in (True, False):
            monkeypatch.setattr(engine, "FUSED_RAY_MAX_WORK", 1 << 26 if fused else 0)
            stages.clear()
            out = tmp_path / f"r{fused}"
            ray = select(SelectConfig(input=str(inp), out=str(out), centroids=str(tmp_path / "l/centroids.npy"),
                                      seed=2, n=8, engine="ray", workers=2, cluster_batch=2, progress=False))
            assert stages == (["step 1 (dedup)"] if fused else ["assign", "step 1 (dedup)"])
            assert ray["rows_after"] == local["rows_after"]
            for f in FILES:
                assert pq.read_table(tmp_path / "l" / f).equals(pq.read_table(out / f)), f
            assert ray_mod.is_initialized()  # not ours to stop
    finally:
        ray_mod.shutdown()


def test_ray_bad_input_fails_before_any_output_and_stops_ray(tmp_path):
    """Ray starts while the value check runs (engine._ray_during_check): a bad row still
    fails with the shard and row named, nothing is written, and the local Ray is shut down."""
    import numpy as np
    import pytest
    import ray as ray_mod

    from bunny.errors import BunnyError
    from selhelp import unit, write_layout

    rng = np.random.default_rng(0)
    img = unit(rng.normal(size=(12, 8)))
    img[5, 2] = np.nan
    inp = write_layout(tmp_path / "in", [unit(rng.normal(size=(6, 8))), img],
                       [unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(12, 8)))], dtype=np.float32)
    with pytest.raises(BunnyError, match=r"shard 1 img_emb row 5 \(gid 11\): NaN or infinite"):
        select(SelectConfig(input=str(inp), out=str(tmp_path / "o"), k=2, engine="ray", workers=2, progress=False))
    assert not (tmp_path / "o").exists()
    assert not ray_mod.is_initialized()


def test_ray_joins_a_running_cluster_and_leaves_it_running(make_input, tmp_path):
    """--address: the run joins a Ray started outside it (here `ray start --head`), gives the
    embedded engine's output, and only disconnects: the cluster is still there afterwards."""
    import subprocess
    import sys
    from pathlib import Path

    import ray as ray_mod

    ray_cli = str(Path(sys.executable).with_name("ray"))
    inp = make_input(shard_sizes=(120, 90), seed=4)
    local = select(SelectConfig(input=str(inp), out=str(tmp_path / "l"), k=3, seed=1, n=6, progress=False))
    subprocess.run([ray_cli, "start", "--head", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True)
    try:
        joined = select(SelectConfig(input=str(inp), out=str(tmp_path / "j"), centroids=str(tmp_path / "l/centroids.npy"),
                                     seed=1, n=6, engine="ray", address="auto", workers=2, progress=False))
        assert joined["rows_after"] == local["rows_after"]
        for f in FILES:
            assert pq.read_table(tmp_path / "l" / f).equals(pq.read_table(tmp_path / "j" / f)), f
        assert not ray_mod.is_initialized()  # disconnected
        ray_mod.init(address="auto", log_to_driver=False)  # the cluster is still running
        assert ray_mod.cluster_resources().get("CPU") == 2
        ray_mod.shutdown()
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True)


def test_engine_starts_a_lean_local_ray(make_input, tmp_path, monkeypatch):
    """Without --address the engine starts its own Ray: GCS, raylet and workers only (no API
    server, autoscaler monitor or log monitor), workers with the kernel's modules preloaded
    and lean serialization add-ons, the value check in a forked child;
    the output is the embedded engine's, Ray's methods are restored and Ray is stopped."""
    import ray as ray_mod

    from bunny.select import ray_local
    from bunny.select.ray_engine import RayMap

    inp = make_input(shard_sizes=(130, 90), seed=6)
    local = select(SelectConfig(input=str(inp), out=str(tmp_path / "l"), k=4, seed=3, n=7, progress=False))
    seen = {}
    call = RayMap.__call__

    def preloaded():  # defined here: pickled by value (the workers cannot import this test module)
        import sys

        from bunny.select.ray_local import PRELOAD

        from ray.util import serialization_addons

        # the lean add-ons were in place before the task's arguments were read: no pydantic
        return (all(m in sys.modules for m in PRELOAD) and serialization_addons.apply.bunny_lean
                and "pydantic" not in sys.modules and "starlette" not in sys.modules)

    def spy(self, fn, args, desc, *a, **k):
        if not seen:
            seen["lean"] = self.lean
            seen["processes"] = set(ray_mod._private.worker._global_node.all_processes)
            seen["preloaded"] = ray_mod.get(ray_mod.remote(preloaded).remote())
        return call(self, fn, args, desc, *a, **k)

    monkeypatch.setattr(RayMap, "__call__", spy)
    from bunny.select import forked

    forks = []
    fork_init = forked.ForkCall.__init__
    monkeypatch.setattr(forked.ForkCall, "__init__", lambda self, fn, *a, **k: forks.append(k) or
                        fork_init(self, fn, *a, **k))
    from ray.util import serialization_addons

    addons = serialization_addons.apply
    node_methods = {m: getattr(ray_mod._private.node.Node, m) for m in ray_local.SKIPPED}
    get_node = ray_mod._private.services.get_node
    out = select(SelectConfig(input=str(inp), out=str(tmp_path / "r"), centroids=str(tmp_path / "l/centroids.npy"),
                              seed=3, n=7, engine="ray", workers=2, progress=False))
    assert out["rows_after"] == local["rows_after"]
    for f in FILES:
        assert pq.read_table(tmp_path / "l" / f).equals(pq.read_table(tmp_path / "r" / f)), f
    assert sorted(seen["lean"]) == sorted([*ray_local.SKIPPED, "get_node"])  # every patch applied on this Ray
    assert {"gcs_server", "raylet"} <= seen["processes"]
    assert not seen["processes"] & {"dashboard", "monitor", "log_monitor"}
    assert seen["preloaded"]
    assert not ray_mod.is_initialized()
    assert {m: getattr(ray_mod._private.node.Node, m) for m in ray_local.SKIPPED} == node_methods
    assert ray_mod._private.services.get_node is get_node
    assert serialization_addons.apply is addons  # the driver's lean add-ons restored on close
    assert forks == [{"desc": "value check", "nice": 10}]  # the check ran in a forked child
