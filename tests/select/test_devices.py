"""The torch path (--device torch-cpu here; cuda too when a GPU is present) and the
pruned similarity kernel give exactly the numpy path's edges, labels and ids."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from bunny.select import bound, rules
from bunny.select.assign import Assigner
from bunny.select.engine import SelectConfig, select
from selhelp import assert_exact_at_every_rank, edge_set, unit

torch = pytest.importorskip("torch")
DEVICES = ["torch-cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FILES = ["selected.parquet", "stages/dedup.parquet", "stages/clip.parquet", "stages/centroid.parquet"]


def chain():
    ang = np.arccos(0.9)
    return unit([[1, 0, 0], [np.cos(ang), np.sin(ang), 0], [np.cos(2 * ang), np.sin(2 * ang), 0],
                 [0, 0, 1]]).astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_components_on_hand_built_inputs(device):
    from bunny.select.gpu import torch_edges

    edges = torch_edges(device)
    x = chain()
    assert list(rules.components(x, 0.86, edges=edges)) == [0, 0, 0, 3]
    assert list(rules.components(x[[0, 2, 3]], 0.86, edges=edges)) == [0, 1, 2]
    # exact duplicates are one node
    v = unit(np.random.default_rng(0).normal(size=(1, 64))).astype(np.float16).astype(np.float32)
    assert len(set(rules.components(np.repeat(v, 4, axis=0), 0.86, edges=edges))) == 1
    assert list(rules.components(np.eye(5, dtype=np.float32), 0.86, edges=edges)) == [0, 1, 2, 3, 4]
    # strict threshold: equal to the canonical dot is no edge, one ulp below is
    ang = np.arccos(0.5)
    y = np.array([[1, 0], [np.cos(ang), np.sin(ang)]], np.float32)
    dot = rules.pair_dots(y, np.array([0]), np.array([1]))[0]
    assert len(set(rules.components(y, dot, edges=edges))) == 2
    assert len(set(rules.components(y, np.nextafter(dot, -1), edges=edges))) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_torch_edges_equal_numpy_edges_near_the_threshold(device):
    from bunny.select.gpu import torch_edges

    rng = np.random.default_rng(3)
    x = unit(rng.normal(size=(8, 48))[rng.integers(8, size=700)] + 0.3 * rng.normal(size=(700, 48)))
    x = x.astype(np.float16).astype(np.float32)
    sim = x.astype(np.float64) @ x.astype(np.float64).T
    iu = np.triu_indices(len(x), 1)
    # thresholds placed on (and next to) actual pair values: decided by the exact rule
    for thr in [0.8, float(np.sort(sim[iu])[-500]), float(np.nextafter(np.sort(sim[iu])[-500], 2))]:
        want = edge_set(rules.dense_edges(x, thr, block=64))
        assert edge_set(torch_edges(device, block=64)(x, thr)) == want
        exact = rules.pair_dots(x, iu[0], iu[1]) > thr
        assert want == set(zip(iu[0][exact].tolist(), iu[1][exact].tolist()))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_assignment_equals_faiss(device):
    from bunny.select.gpu import TorchAssigner

    c = np.array([[0, 1], [1, 0], [1, 0], [0, -1]], np.float32)
    x = np.array([[1, 0], [0.6, 0.8], [np.sqrt(0.5), np.sqrt(0.5)]], np.float32)
    assert TorchAssigner(c, device)(x).tolist() == [1, 0, 0]  # ties to the lower index
    rng = np.random.default_rng(1)
    c = unit(rng.normal(size=(40, 32))).astype(np.float32)
    x = unit(c[rng.integers(40, size=3000)] + 0.8 * rng.normal(size=(3000, 32))).astype(np.float32)
    x[:20] = (c[3] + c[7]) / np.linalg.norm(c[3] + c[7])  # equidistant rows
    assert np.array_equal(TorchAssigner(c, device)(x), Assigner(c)(x))


def test_pruned_kernel_equals_full_product():
    assert_exact_at_every_rank(lambda x, t, r: bound.bounded_edges(x, t, bound.bound_plan(x, t, rank=r), block=128))


def test_bound_slack_covers_float32_rounding():
    pair, raise_ = bound._bound_slack(256, 768)
    assert 1e-4 < pair < 1e-2 and 0 < raise_ < 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["bunny", "semdedup"])
def test_select_on_torch_device_equals_cpu(make_input, tmp_path, device, mode):
    inp = make_input(shard_sizes=(130, 90, 110), seed=11)
    cpu = select(SelectConfig(input=str(inp), out=str(tmp_path / "cpu"), k=5, seed=4, n=9, mode=mode, progress=False))
    dev = select(SelectConfig(input=str(inp), out=str(tmp_path / "dev"), centroids=str(tmp_path / "cpu/centroids.npy"),
                              seed=4, n=9, mode=mode, device=device, workers=2, progress=False))
    assert dev["rows_after"] == cpu["rows_after"] and dev["device"] == device
    for f in FILES:
        assert pq.read_table(tmp_path / "cpu" / f).equals(pq.read_table(tmp_path / "dev" / f)), f


def test_unknown_device_is_refused(make_input, tmp_path):
    from bunny.errors import BunnyError

    inp = make_input()
    with pytest.raises(BunnyError, match="--device"):
        select(SelectConfig(input=str(inp), out=str(tmp_path / "o"), k=3, device="tpu", progress=False))
    if not torch.cuda.is_available():
        with pytest.raises(BunnyError, match="no CUDA device"):
            select(SelectConfig(input=str(inp), out=str(tmp_path / "o"), k=3, device="cuda", progress=False))


def test_assignment_without_faiss_is_identical(monkeypatch):
    import sys

    rng = np.random.default_rng(2)
    c = unit(rng.normal(size=(30, 24))).astype(np.float32)
    x = unit(c[rng.integers(30, size=2000)] + 0.7 * rng.normal(size=(2000, 24))).astype(np.float32)
    x[:10] = (c[1] + c[2]) / np.linalg.norm(c[1] + c[2])
    want = Assigner(c)(x)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    a = Assigner(c)
    assert type(a.index).__name__ == "_NumpyIndex"
    assert np.array_equal(a(x), want)
