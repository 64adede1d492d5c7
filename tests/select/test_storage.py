"""Input folders named by URL through fsspec (storage.py): the same files as from a path, on
fsspec's in-memory and local filesystems; a URL whose filesystem is not installed is a clear
error before anything is written."""
import sys

import fsspec
import numpy as np
import pytest

from bunny.errors import BunnyError
from bunny.select import storage
from bunny.select.engine import SelectConfig, select
from test_engine import FILES, tables


def _to_memory(root, name: str) -> str:
    fs = fsspec.filesystem("memory")
    for p in root.rglob("*"):
        if p.is_file():
            fs.pipe(f"/{name}/{p.relative_to(root)}", p.read_bytes())
    return f"memory://{name}"


@pytest.mark.parametrize("fork", [True, False])
def test_memory_url_gives_the_files_of_the_path(make_input, tmp_path, monkeypatch, fork):
    monkeypatch.setenv("BUNNY_SELECT_CACHE", str(tmp_path / "cache"))
    inp = make_input(shard_sizes=(140, 90, 120), seed=3)
    url = _to_memory(inp, f"emb{int(fork)}")
    kw = dict(k=4, seed=2, n=20, workers=2, fork=fork, progress=False)
    a = select(SelectConfig(input=str(inp), out=str(tmp_path / "path"), **kw))
    b = select(SelectConfig(input=url, out=str(tmp_path / "url"), **kw))
    assert a["rows_after"] == b["rows_after"]
    ta, tb = tables(tmp_path / "path"), tables(tmp_path / "url")
    for f in FILES:
        assert ta[f].equals(tb[f]), f
    # the tasks read local copies of the shards, one per shard file they touched
    assert len(list((tmp_path / "cache").glob("*_img_emb_*.npy"))) == 3


def test_streamed_rows_equal_the_file(tmp_path):
    x = np.arange(7 * 5, dtype=np.float16).reshape(7, 5)
    np.save(tmp_path / "a.npy", x)
    s = storage.StreamedNpy(f"file://{tmp_path}/a.npy")
    assert s.shape == (7, 5) and s.dtype == np.float16 and len(s) == 7
    assert np.array_equal(s[2:5], x[2:5]) and np.array_equal(s[5:100], x[5:]) and s[6:3].shape == (0, 5)


def test_local_copy_is_fetched_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("BUNNY_SELECT_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe("/copy/a.npy", b"one")
    first = storage.local_copy("memory://copy/a.npy")
    assert first.read_bytes() == b"one" and storage.local_copy("memory://copy/a.npy") == first
    fs.pipe("/copy/a.npy", b"other")  # a new size: a new copy (in a new process: this one remembers)
    monkeypatch.setattr(storage, "_COPIES", {})
    assert storage.local_copy("memory://copy/a.npy").read_bytes() == b"other"
    assert not list((tmp_path / "cache").glob(".*tmp"))


def test_url_without_its_filesystem_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as when s3fs is not installed
    with pytest.raises(BunnyError, match=r"s3://bucket/emb: the filesystem for this URL is not installed.*s3fs"):
        select(SelectConfig(input="s3://bucket/emb", out=str(tmp_path / "o"), k=2, progress=False))
    with pytest.raises(BunnyError, match=r"nosuchfs://x: Protocol not known"):
        select(SelectConfig(input="nosuchfs://x", out=str(tmp_path / "o"), k=2, progress=False))
    assert not (tmp_path / "o").exists()
