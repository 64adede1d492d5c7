"""Input shards named by URL (`s3://`, `gs://`, `memory://`, `file://`, ...) through fsspec.

A plain path is read in place (memory-mapped). A URL is read by whoever needs its rows:
the value check streams each shard block by block (`StreamedNpy`: reads of whole row
ranges, nothing kept), and the per-shard and per-cluster tasks (on Ray: on the worker's
node) use a local copy of each shard they touch, made once per node in `cache_dir()` and
then memory-mapped like a local file. The driver never sends rows to the workers.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from bunny.atomic import atomic_file
from bunny.errors import BunnyError

_LOCK = threading.Lock()
_FETCHING: dict = {}  # file name -> lock held while this process fetches it
_COPIES: dict = {}  # URL -> its local copy, in this process


def is_url(name) -> bool:
    return "://" in str(name)


def filesystem(url: str):
    """(fsspec filesystem, path within it) for `url`; a clear error when its filesystem is
    unknown or its package is not installed."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:  # fsspec names the package to install ("Install s3fs to access S3")
        raise BunnyError(f"input {url}: the filesystem for this URL is not installed: {exc}") from exc
    except ValueError as exc:  # "Protocol not known: ..."
        raise BunnyError(f"input {url}: {exc}") from exc


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def list_names(folder: str) -> list[str]:
    """The file names in `folder` (a path or a URL); [] when it does not exist."""
    if not is_url(folder):
        p = Path(folder)
        return [c.name for c in p.iterdir()] if p.is_dir() else []
    fs, path = filesystem(folder)
    if not fs.isdir(path):
        return []
    return [str(name).rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)]


def is_dir(name: str) -> bool:
    if not is_url(name):
        return Path(name).is_dir()
    fs, path = filesystem(name)
    return fs.isdir(path)


def open_binary(name: str):
    """A binary file object for reading a path or a URL."""
    if not is_url(name):
        return open(name, "rb")
    fs, path = filesystem(name)
    return fs.open(path, "rb")


def npy_header(f) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the .npy file object `f` (numpy's format reader)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran:
        raise BunnyError(f"{getattr(f, 'path', f)}: Fortran-ordered .npy arrays are not supported")
    return shape, dtype, f.tell()


class StreamedNpy:
    """A (n, d) .npy array at a URL, read a row range at a time (`arr[a:b]`, as the value
    check reads): each read fetches exactly those rows."""

    def __init__(self, url: str):
        self.url = url
        with open_binary(url) as f:
            self.shape, self.dtype, self.offset = npy_header(f)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("StreamedNpy reads contiguous row ranges only")
        a, b, _ = rows.indices(self.shape[0])
        b = max(a, b)
        with open_binary(self.url) as f:
            f.seek(self.offset + a * self.row_bytes)
            data = f.read((b - a) * self.row_bytes)
        return np.frombuffer(data, self.dtype).reshape((b - a, *self.shape[1:]))


def cache_dir() -> Path:
    """Where local copies of URL shards are kept: $BUNNY_SELECT_CACHE, else a folder in the
    system's temporary directory. Shared by the processes of one machine."""
    return Path(os.environ.get("BUNNY_SELECT_CACHE") or Path(tempfile.gettempdir()) / "bunny-select-cache")


def local_copy(url: str) -> Path:
    """A local copy of the file at `url`, fetched once per machine (named by the URL, its size
    and modification stamp where the filesystem gives one, so a changed file is fetched
    again); written to a temporary name and renamed, so processes fetching it at once never
    see a partial file. Remembered per process: a task that touches the shard again asks
    the store nothing."""
    got = _COPIES.get(url)
    if got is not None and got.exists():
        return got
    fs, path = filesystem(url)
    info = fs.info(path)
    stamp = f"{url}|{info.get('size')}|{info.get('mtime') or info.get('LastModified') or info.get('ETag') or ''}"
    name = hashlib.sha256(stamp.encode()).hexdigest()[:32] + "_" + path.rsplit("/", 1)[-1]
    target = cache_dir() / name
    with _LOCK:  # one fetch per file in a process (other processes may fetch it at the same time)
        lock = _FETCHING.setdefault(name, threading.Lock())
    with lock:
        if not target.exists():
            with atomic_file(target) as tmp:
                fs.get_file(path, str(tmp))
    _COPIES[url] = target
    return target
