import os

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
