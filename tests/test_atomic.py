"""Atomic writes: a target is either its old content or its complete new content, never a
half-written file; temporaries are removed whenever the writing process survives."""
import os
import signal
import subprocess
import sys

import pytest

from bunny.atomic import atomic_file, atomic_files, atomic_folder, atomic_update, atomic_write
from bunny.errors import BunnyError


def test_replaces_target_only_on_success(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "one"
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers


def test_atomic_file_writes_in_place_of_the_old_file(tmp_path):
    target = tmp_path / "sub" / "data.json"  # a missing folder is created
    assert atomic_write(target, "old\n") == target
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".data.json.") and not tmp.exists()
        tmp.write_text("new\n")
        assert target.read_text() == "old\n"  # nothing visible before the block ends
    assert target.read_text() == "new\n"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert os.listdir(target.parent) == ["data.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.json"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(target) as tmp:
            tmp.write_text("ne")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["data.json"]


def test_several_files_appear_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_text("old a")
    with pytest.raises(RuntimeError):
        with atomic_files(a, b) as (ta, tb):
            ta.write_text("new a")
            raise RuntimeError("failed before b was written")
    assert a.read_text() == "old a" and not b.exists()
    assert os.listdir(tmp_path) == ["a.bin"]
    with atomic_files(a, b) as (ta, tb):
        ta.write_text("new a")
        tb.write_text("new b")
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin"]


def test_killed_writer_leaves_the_old_file(tmp_path):
    """SIGKILL mid-write: no cleanup can run, so a hidden temporary stays, but the target
    keeps its old content in full."""
    target = tmp_path / "data.json"
    target.write_text("old\n")
    script = (
        "import os, signal, sys\n"
        "from bunny.atomic import atomic_file\n"
        "with atomic_file(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('half of the new')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert target.read_text() == "old\n"
    leftovers = sorted(set(os.listdir(tmp_path)) - {"data.json"})
    assert len(leftovers) == 1 and leftovers[0].startswith(".data.json.") and leftovers[0].endswith(".tmp")


def test_atomic_update_replaces_written_files_and_keeps_the_others(tmp_path):
    folder = tmp_path / "tower"
    folder.mkdir()
    (folder / "README.md").write_text("kept")
    (folder / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_update(folder) as tmp:
            (tmp / "config.json").write_text("half")
            raise RuntimeError("killed")
    assert sorted(os.listdir(folder)) == ["README.md", "config.json"]
    assert (folder / "config.json").read_text() == "old"
    with atomic_update(folder) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "model.safetensors").write_text("weights")
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    assert (folder / "config.json").read_text() == "new" and (folder / "README.md").read_text() == "kept"
    with pytest.raises(BunnyError, match="replaces files only; sub is a folder"):
        with atomic_update(folder) as tmp:
            (tmp / "sub").mkdir()
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_written_files_and_folders_get_the_umask_permissions(tmp_path, umask):
    """safetensors' writer creates 0600 files and mkdtemp 0700 folders whatever the umask; what
    the helpers put in place has a plain create's permissions, so another user can read an
    export or checkpoint where the umask allows it."""
    import torch
    from safetensors.torch import save_file

    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    with atomic_file(tmp_path / "one.safetensors") as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))
    assert _mode(tmp_path / "one.safetensors") == file_mode
    with atomic_folder(tmp_path / "export") as tmp:
        (tmp / "sub").mkdir()
        save_file({"a": torch.zeros(2)}, str(tmp / "sub" / "model.safetensors"))
    assert _mode(tmp_path / "export") == folder_mode and _mode(tmp_path / "export" / "sub") == folder_mode
    assert _mode(tmp_path / "export" / "sub" / "model.safetensors") == file_mode
    with atomic_update(tmp_path / "export") as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp / "extra.safetensors"))
    assert _mode(tmp_path / "export" / "extra.safetensors") == file_mode


def test_protect_others_never_deletes_what_the_new_content_lacks(tmp_path):
    """A user-named output folder holding other files is left as it was, with the files named;
    an older version of the same output (every name present again) is replaced."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "config.json").write_text("old")
    with pytest.raises(BunnyError, match=r"already holds notes\.txt, which .* would delete"):
        with atomic_folder(target, protect_others=True) as tmp:
            (tmp / "config.json").write_text("new")
    assert (target / "notes.txt").read_text() == "mine" and (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_folder(target, protect_others=True) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "notes.txt").write_text("theirs")
    assert (target / "notes.txt").read_text() == "theirs" and (target / "config.json").read_text() == "new"
    (tmp_path / "file").write_text("x")
    with pytest.raises(BunnyError, match="is a file; an output folder cannot"):
        with atomic_folder(tmp_path / "file", protect_others=True):
            pass


def test_permissions_leave_symlinked_files_alone(tmp_path, umask):
    """A link in the written folder (e.g. into a hub cache) keeps its target's permissions."""
    outside = tmp_path / "blob"
    outside.write_text("cached")
    os.chmod(outside, 0o600)
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "link").symlink_to(outside)
        (tmp / "own.txt").write_text("x")
    assert _mode(outside) == 0o600
    assert _mode(tmp_path / "out" / "own.txt") == 0o666 & ~umask
