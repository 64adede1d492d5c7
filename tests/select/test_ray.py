"""The Ray engine on a local Ray gives exactly the embedded engine's output (one module,
one Ray start: Ray startup is slow)."""
import pyarrow.parquet as pq

from bunny.select.engine import SelectConfig, select

FILES = ["selected.parquet", "stages/dedup.parquet", "stages/clip.parquet", "stages/centroid.parquet"]


def test_ray_equals_embedded(make_input, tmp_path):
    inp = make_input(shard_sizes=(150, 100, 110), seed=9)
    local = select(SelectConfig(input=str(inp), out=str(tmp_path / "l"), k=5, seed=2, n=8, progress=False))
    ray = select(SelectConfig(input=str(inp), out=str(tmp_path / "r"), centroids=str(tmp_path / "l/centroids.npy"),
                              seed=2, n=8, engine="ray", workers=2, cluster_batch=2, progress=False))
    assert ray["rows_after"] == local["rows_after"]
    for f in FILES:
        assert pq.read_table(tmp_path / "l" / f).equals(pq.read_table(tmp_path / "r" / f)), f
