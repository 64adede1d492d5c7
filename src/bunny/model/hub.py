"""Models named by Hugging Face hub id: fetched with `huggingface_hub.snapshot_download`
into the standard cache (`HF_HOME` / `HF_HUB_CACHE`), served from it under `HF_HUB_OFFLINE=1`.

Local folder or hub id is decided without guessing: an existing local path wins; a string
that is a valid repo id (`ORG/NAME` or `NAME`) and no local path is a hub id; anything else
is an error. Only the files a checkpoint needs are fetched: configs, tokenizer files, chat
templates and weights (safetensors, or `.bin` when the repo has no safetensors weights, read
later with `torch.load(weights_only=True)`); never remote code (`*.py`) or other formats.
"""
from __future__ import annotations

import fnmatch
import json
import os
from contextlib import contextmanager
from pathlib import Path

from bunny.errors import BunnyError

# Configs and tokenizers: every *.json (config.json, tokenizer.json, tokenizer_config.json,
# preprocessor_config.json, shard indexes, adapter_config.json, chat_template.json, ...) and
# the tokenizers' non-JSON vocabularies (sentencepiece, tiktoken, BPE merges, WordPiece).
METADATA_PATTERNS = ("*.json", "*.jinja", "tokenizer.model", "spiece.model", "*.tiktoken", "merges.txt", "vocab.*")
SAFETENSORS_PATTERNS = ("*.safetensors",)
# Tensor files that sit beside the model's weights: a PEFT adapter, a stage-1 projector
# (ours, or the reference's, which has no safetensors twin) and the reference's LoRA extras.
SIDE_PATTERNS = ("adapter_model.safetensors", "mm_projector.safetensors", "mm_projector.bin", "non_lora_trainables.bin")
# Pickled weights, fetched only when the repo has no safetensors twin of them.
MODEL_BIN_PATTERN = "pytorch_model*.bin"
ADAPTER_BIN_PATTERN = "adapter_model.bin"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def allow_patterns(repo_files: list[str] | None, shards: list[str] | None = None) -> list[str]:
    """The files to fetch, given the repo's file list (None: unknown, e.g. offline) and the
    shards its safetensors index names (None: no index). With an index only its shards are
    weights, so a repo's other copies (e.g. a `consolidated.safetensors`) are not fetched."""
    weights = [*shards, *SIDE_PATTERNS] if shards is not None else [*SAFETENSORS_PATTERNS, *SIDE_PATTERNS]
    patterns = [*METADATA_PATTERNS, *weights]
    files = repo_files or []
    if shards is None and (repo_files is None or not any(fnmatch.fnmatch(f, "model*.safetensors") for f in files)):
        patterns.append(MODEL_BIN_PATTERN)
    if repo_files is None or "adapter_model.safetensors" not in files:
        patterns.append(ADAPTER_BIN_PATTERN)
    return patterns


def index_shards(folder: Path) -> list[str] | None:
    """The shard files a snapshot's safetensors index names; None without an index."""
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return None
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as exc:
        raise BunnyError(f"{index} is not a valid shard index ({exc!r})") from None


def is_hub_id(name: str) -> bool:
    """True for a string huggingface_hub accepts as a repo id (it need not exist)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def local_or_hub(name_or_path: str | os.PathLike, revision: str | None = None, what: str = "model") -> Path:
    """The local folder of a model: the path itself, or the cached hub snapshot of a hub id.

    `what` names the role in error messages ("model", "vision tower", "base LLM", ...).
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if revision:
            raise BunnyError(f"{what} {name!r} is a local path; a revision ({revision!r}) applies only to hub ids")
        return path
    if not is_hub_id(name):
        raise BunnyError(
            f"{what} {name!r} is neither a local folder nor a hub id (ORG/NAME): no such path, and "
            "not a valid repo id"
        )
    return snapshot(name, revision, what)


def snapshot(repo_id: str, revision: str | None = None, what: str = "model") -> Path:
    """Fetch (or find in the cache) the files a checkpoint needs; the snapshot folder.

    Two steps: configs and tokenizers first (this resolves the revision to a commit and
    lists the repo's files), then the weights of that same commit in the repo's preferred
    format. Under HF_HUB_OFFLINE=1 both are served from the cache.
    """
    from huggingface_hub import get_cached_repo_tree, is_offline_mode, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    label = f"{what} {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    with _hub_errors(repo_id, revision, label):
        first = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(METADATA_PATTERNS),
                                       library_name="bunny"))
        commit = first.name  # snapshot folders are named by their commit hash
        try:
            files = [f.path for f in get_cached_repo_tree(repo_id, revision=commit)]
        except CachedRepoTreeNotFoundError:  # a cache filled by other tools, read offline
            files = None
        # Offline, read the cache only: a snapshot missing files of its cached listing is then
        # refused as incomplete (naming the files) instead of failing on a download attempt.
        patterns = allow_patterns(files, index_shards(first))
        folder = Path(snapshot_download(repo_id, revision=commit, allow_patterns=patterns,
                                        local_files_only=is_offline_mode(), library_name="bunny"))
    if not (folder / "config.json").is_file():
        raise BunnyError(
            f"{label}: the hub snapshot {folder} holds no config.json; not a model repo bunny can load "
            "(or an incomplete cache entry: fetch it again online)"
        )
    return folder


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, label: str):
    """Turns huggingface_hub's download errors into BunnyErrors naming the id."""
    try:
        yield
    except Exception as exc:
        message = _message(exc, repo_id, revision, label)
        if message is None:
            raise
        raise BunnyError(message) from None


def _message(exc: BaseException, repo_id: str, revision: str | None, label: str) -> str | None:
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if isinstance(exc, GatedRepoError):
        return (f"{label}: the hub repo is gated; accept its conditions at https://huggingface.co/{repo_id} "
                "and log in (`hf auth login` or HF_TOKEN)")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"{label}: no local folder of that name, and no hub repo {repo_id!r} (it does not exist, "
                "or it is private: log in with `hf auth login` or HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return f"{label}: the hub repo {repo_id!r} has no revision {revision!r} (branch, tag or commit)"
    if isinstance(exc, IncompleteSnapshotError):
        return (f"{label}: the cached snapshot is incomplete, and downloads are off (HF_HUB_OFFLINE=1) or the "
                f"hub cannot be reached; fetch it again online. huggingface_hub: {exc}")
    if isinstance(exc, LocalEntryNotFoundError):
        where = f"the hub cache {constants.HF_HUB_CACHE}"
        if constants.is_offline_mode():
            return (f"{label} is not in {where} and downloads are off (HF_HUB_OFFLINE=1); fetch it "
                    "once online, or unset HF_HUB_OFFLINE")
        return f"{label} is not in {where} and the hub cannot be reached ({exc})"
    if isinstance(exc, HfHubHTTPError):
        return f"{label}: the hub refused the download ({exc})"
    return None
