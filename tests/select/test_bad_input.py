"""Every bad input fails loudly, naming the shard and row; the CLI prints it."""
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

from bunny.cli import main
from bunny.errors import BunnyError
from bunny.select.engine import SelectConfig, select
from selhelp import unit, write_layout


def _x(n, d=8, seed=0):
    return unit(np.random.default_rng(seed).normal(size=(n, d)))


def sel(inp, out, **kw):
    return select(SelectConfig(input=str(inp), out=str(out), progress=False, **{"k": 2, **kw}))


def test_row_counts_differ(tmp_path):
    inp = write_layout(tmp_path / "in", [_x(10), _x(12)], [_x(10), _x(11)])
    with pytest.raises(BunnyError, match=r"shard 1: row counts differ: img_emb 12, text_emb 11, metadata 12"):
        sel(inp, tmp_path / "o")


def test_dim_mismatch_between_modalities_shards_and_centroids(tmp_path):
    inp = write_layout(tmp_path / "a", [_x(10)], [_x(10, d=6)])
    with pytest.raises(BunnyError, match="shard 0: image dim 8 != text dim 6"):
        sel(inp, tmp_path / "o")
    inp = write_layout(tmp_path / "b", [_x(10), _x(10, d=6)], [_x(10), _x(10, d=6)])
    with pytest.raises(BunnyError, match="shard 1: dim 6 differs"):
        sel(inp, tmp_path / "o")
    inp = write_layout(tmp_path / "c", [_x(10)], [_x(10)])
    np.save(tmp_path / "c.npy", np.ones((3, 5), np.float32))
    with pytest.raises(BunnyError, match=r"shape \(3, 5\), expected \(k, 8\)"):
        sel(inp, tmp_path / "o", centroids=str(tmp_path / "c.npy"), k=None)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_rows(tmp_path, bad):
    t = _x(10)
    t[7, 3] = bad
    inp = write_layout(tmp_path / "in", [_x(5), _x(10)], [_x(5), t], dtype=np.float32)
    with pytest.raises(BunnyError, match=r"shard 1 text_emb row 7 \(gid 12\): NaN or infinite"):
        sel(inp, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing written, so a fixed input can reuse the folder


def test_non_unit_norm_warns_and_renormalize_fixes(tmp_path):
    x, t = _x(40, seed=1), _x(40, seed=2)
    inp = write_layout(tmp_path / "u", [x], [t], dtype=np.float32)
    ref = sel(inp, tmp_path / "ref", seed=3)
    scaled = write_layout(tmp_path / "s", [x * 3.0], [t], dtype=np.float32)
    with pytest.warns(UserWarning, match=r"40 embedding rows are not unit-norm \(first: shard 0 img_emb row 0"):
        sel(scaled, tmp_path / "w", centroids=str(tmp_path / "ref/centroids.npy"), k=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = sel(scaled, tmp_path / "f", centroids=str(tmp_path / "ref/centroids.npy"), k=None, renormalize=True)
    assert fixed["rows_after"] == ref["rows_after"]
    a = pq.read_table(tmp_path / "ref/selected.parquet").column("gid").to_pylist()
    assert a == pq.read_table(tmp_path / "f/selected.parquet").column("gid").to_pylist()


def test_missing_and_extra_shards(tmp_path):
    inp = write_layout(tmp_path / "in", [_x(5)] * 3, [_x(5)] * 3)
    for kind in ("img_emb/img_emb", "text_emb/text_emb"):
        (inp / f"{kind}_0001.npy").rename(inp / f"{kind}_0001.bak")
    (inp / "metadata/metadata_0001.parquet").unlink()
    with pytest.raises(BunnyError, match="shard 1 is missing"):
        sel(inp, tmp_path / "o")
    np.save(inp / "img_emb/img_emb_0003.npy", _x(5).astype(np.float16))  # an image shard with no partners
    with pytest.raises(BunnyError, match="shard 3 is incomplete: missing text_emb/text_emb_0003.npy, metadata/"):
        sel(inp, tmp_path / "o")


def test_non_empty_output_refused_unless_overwrite(tmp_path):
    inp = write_layout(tmp_path / "in", [_x(20)], [_x(20)])
    (tmp_path / "o").mkdir()
    (tmp_path / "o/other.txt").write_text("mine")
    with pytest.raises(BunnyError, match="not empty: pass --overwrite"):
        sel(inp, tmp_path / "o")
    sel(inp, tmp_path / "o", overwrite=True)
    assert not (tmp_path / "o/other.txt").exists() and (tmp_path / "o/selected.parquet").exists()


def test_cli_prints_error_and_runs(tmp_path, capsys):
    inp = write_layout(tmp_path / "in", [_x(30)], [_x(30)])
    assert main(["data", "select", "--input", str(inp), "--out", str(tmp_path / "o"), "--k", "2",
                 "--no-progress", "--n", "3"]) == 0
    assert "selected" in capsys.readouterr().out
    assert main(["data", "select", "--input", str(inp), "--out", str(tmp_path / "o"), "--k", "2"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["data", "select", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "p"), "--k", "2"]) == 2
