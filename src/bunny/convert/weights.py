"""Reading weight files safely and loading them strictly.

`.bin` files are pickles: they are only ever opened with `torch.load(weights_only=True)`,
which refuses anything but tensors and plain containers. Every load into a module compares
key sets and shapes first and fails with the keys at fault; nothing is loaded non-strictly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bunny.errors import BunnyError

# Files of the PEFT adapter; they sit beside merged shards in no layout, but are never shards.
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Rotary caches that old transformers versions saved as weights; recomputed at init.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
LIST_LIMIT = 12


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one `.safetensors` or `.bin` file, on the CPU."""
    if not path.is_file():
        raise BunnyError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except BunnyError:
        raise
    except Exception as exc:  # corrupt or non-tensor pickles: name the file, not a traceback
        raise BunnyError(f"cannot read weight file {path}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BunnyError(f"{path} does not hold a flat dict of tensors")
    return state


def shard_files(folder: Path) -> list[Path]:
    """The model weight files of an HF folder: from its index if it has one, else all shards."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise BunnyError(f"{index} is not a valid shard index ({exc})") from None
            return [folder / name for name in sorted(set(weight_map.values()))]
    safetensors = sorted(p for p in folder.glob("*.safetensors") if p.name not in ADAPTER_FILES)
    if safetensors:
        return safetensors
    return sorted(p for p in folder.glob("pytorch_model*.bin"))


def read_shards(folder: Path) -> dict[str, torch.Tensor]:
    files = shard_files(folder)
    if not files:
        raise BunnyError(f"{folder} holds no model weights (*.safetensors or pytorch_model*.bin)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        for key, value in load_tensor_file(path).items():
            if key in state:
                raise BunnyError(f"key {key} appears in more than one shard of {folder} ({path.name})")
            state[key] = value
    return {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}


def _listing(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - LIST_LIMIT} more" if len(keys) > LIST_LIMIT else ""
    return ", ".join(keys[:LIST_LIMIT]) + more


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str, optional: set[str] = frozenset()) -> None:
    """Load `state` into `module`, failing on any missing, unexpected or misshapen key.

    `optional` keys may be absent (a tied output head is stored once, as the embeddings).
    `source` names where the tensors came from, for the error message.
    """
    own = module.state_dict()
    missing = set(own) - set(state) - set(optional)
    unexpected = set(state) - set(own)
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(state) & set(own))
              if state[k].shape != own[k].shape]
    if shapes:
        problems.append(f"shape mismatches (file vs model): {', '.join(shapes[:LIST_LIMIT])}")
    if problems:
        raise BunnyError(f"{source} does not match the model it should load into; " + "; ".join(problems))
    # Every key was checked above; strict=False only tolerates the declared optional ones.
    with torch.no_grad():
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def tied_head_keys(language_model: nn.Module) -> set[str]:
    """Keys of an output head that shares the input embeddings (saved once, as embeddings)."""
    if not getattr(language_model.config, "tie_word_embeddings", False):
        return set()
    head = language_model.get_output_embeddings()
    return {f"{name}.weight" for name, module in language_model.named_modules() if module is head and name}
