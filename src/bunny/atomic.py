"""Atomic writes: a half-written file or checkpoint must never look complete.

Every write goes to a temporary name beside its target (same folder, so the same file
system) and is renamed over the target with `os.replace` only when it is complete. A write
that fails removes its temporaries and leaves the targets as they were; a process killed
mid-write leaves the targets as they were and a hidden `.NAME.*.tmp` beside them.

- `atomic_file(path)` / `atomic_files(*paths)`: write one or several files (several are
  renamed into place together, after the block, in the order given).
- `atomic_write(path, data)`: a whole str (UTF-8) or bytes payload.
- `atomic_update(folder)`: files written by a library that saves into a folder (e.g.
  `save_pretrained`) replace their namesakes in `folder`; its other files stay.
- `atomic_folder(path)`: a whole folder replaced at once (checkpoints, exports). With
  `protect_others=True` (user-named output folders) an existing folder is replaced only when
  the new content has everything it holds, so `--out` naming a folder of other files is an
  error, not a deletion.

What each of them puts in place gets the permissions a plain `open(path, "w")` / `mkdir` would
give under the process's umask (`plain_permissions`): safetensors' writer creates its files
0600 whatever the umask (safetensors/safetensors#782), and `tempfile.mkdtemp` creates folders
0700, so a checkpoint or export written as one user (a training job, a Docker build) would be
unreadable by another (the server, vLLM).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bunny.errors import BunnyError


def _umask() -> int:
    try:  # Linux reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_permissions(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder and everything under it) the permission bits a plain
    create gets under the current umask: files 0o666 & ~umask, folders 0o777 & ~umask.
    Symbolic links are left alone (chmod would change what they point to)."""
    path = Path(path)
    mask = _umask()
    if path.is_symlink():  # a link's target is not ours to change
        return
    if path.is_dir():
        for folder, _, files in os.walk(path):
            os.chmod(folder, 0o777 & ~mask)
            for name in files:
                if not (Path(folder) / name).is_symlink():
                    os.chmod(Path(folder) / name, 0o666 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def check_output_folder(path: str | os.PathLike) -> Path:
    """Refuse an output folder path that names an existing file (before any work is done)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BunnyError(f"{path} is a file; an output folder cannot replace it or be written into")
    return path


def _temporary_name(target: Path) -> Path:
    # Unique per process and call, so concurrent writers never share a temporary; not created
    # here, so the writer creates it with the usual permissions.
    return target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_files(*targets: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield one temporary path per target (in the target's folder, created if missing) to
    write; when the block ends without an error each temporary replaces its target. On an
    error every temporary is removed and every target is left as it was."""
    paths = [Path(t) for t in targets]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporaries = [_temporary_name(p) for p in paths]
    try:
        yield temporaries
        for tmp in temporaries:
            plain_permissions(tmp)
        for tmp, path in zip(temporaries, paths):
            os.replace(tmp, path)
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces `target` when the block ends without an error."""
    with atomic_files(target) as (tmp,):
        yield tmp


def atomic_write(target: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (str as UTF-8, or bytes) to `target` atomically; returns the target."""
    with atomic_file(target) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(target)


@contextmanager
def atomic_update(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder inside `folder` to write files into; when the block ends
    without an error each of them replaces its namesake in `folder` (one rename per file);
    files of `folder` not written stay. On an error `folder` is left as it was."""
    folder = check_output_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".update-", suffix=".tmp", dir=folder))
    try:
        yield tmp
        written = sorted(tmp.iterdir())
        folders = [p.name for p in written if p.is_dir()]
        if folders:
            raise BunnyError(f"atomic_update({folder}) replaces files only; {', '.join(folders)} is a folder")
        for item in written:
            plain_permissions(item)
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_folder(target: str | os.PathLike, protect_others: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; when the block ends without an error it
    replaces `target` (an existing one is moved aside first, then removed). On an error the
    temporary folder is removed and `target` is left as it was. With `protect_others`, an
    existing `target` holding anything the new content lacks (another model, the source of an
    export, unrelated files) is left as it was and the block's end raises a BunnyError naming
    what would have been deleted."""
    target = check_output_folder(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if protect_others and target.exists():
            lost = sorted(p.name for p in target.iterdir() if not (tmp / p.name).exists())
            if lost:
                more = f" and {len(lost) - 8} more" if len(lost) > 8 else ""
                raise BunnyError(f"{target} already holds {', '.join(lost[:8])}{more}, which writing this "
                                 "output there would delete: choose a new or empty folder, or move them away")
        plain_permissions(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
