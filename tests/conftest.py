import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

# One thread: tiny test models are faster without threading overhead, and CI stays predictable.
torch.set_num_threads(int(os.environ.get("BUNNY_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # The embedded LLM's converted safetensors are shared across tests (slow to build), but
    # a test must never write into the user's real cache unless BUNNY_CACHE says so.
    if "BUNNY_CACHE" not in os.environ:
        monkeypatch.setenv("BUNNY_CACHE", str(tmp_path_factory.getbasetemp().parent / "bunny-cache"))


class HubCache:
    """A Hugging Face hub cache in huggingface_hub's own layout, filled from local folders:
    `models--ORG--NAME/refs/REVISION` holds a commit hash, `snapshots/COMMIT/` the files."""

    def __init__(self, root: Path):
        self.root = root

    def publish(self, repo_id: str, folder: Path, revision: str = "main") -> str:
        """Copy `folder` in as `repo_id` at `revision`; returns the (deterministic) commit hash."""
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        repo = self.root / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)  # no newline: the hub reads the file as is
        return commit


@pytest.fixture(autouse=True)
def hub_cache(tmp_path_factory, monkeypatch) -> HubCache:
    """No test reaches the Hugging Face hub or the user's hub cache: downloads are off and
    the cache is an empty folder of the test's own (tests of hub ids write the hub's layout
    into it). Set for this process (huggingface_hub reads its env vars at import) and for
    subprocesses (the env vars)."""
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hf-hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return HubCache(cache)
