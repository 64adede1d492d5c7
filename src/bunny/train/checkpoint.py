"""Resumable training checkpoints, written atomically.

A checkpoint holds only what training changes: the trainable parameters (safetensors),
the optimizer and scheduler states, the step, and the loss history. It is written into a
temporary sibling folder and renamed into place, so a run killed while saving leaves the
previous checkpoint intact and never a half-written one under a real name.

A sharded (fsdp) run writes the same files from its gathered state: the full trainable
tensors, and the optimizer state keyed by parameter name (state.json says
`"optimizer_layout": "by_name"`) rather than by position. Either kind resumes either kind of
run, with any number of processes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bunny.atomic import atomic_folder
from bunny.errors import BunnyError

PREFIX = "step-"
BY_NAME = "by_name"  # state.json's optimizer_layout for a sharded run's checkpoint


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, scheduler, history: list[dict],
                    keep: int, gathered: tuple[dict, dict] | None = None) -> Path:
    """`gathered`: a sharded run's (full trainables, optimizer state by name) in place of
    reading them from `model` and `optimizer`."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{PREFIX}{step:07d}"
    state = {"step": step, "history": history}
    if gathered is None:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        optim_state = optimizer.state_dict()
    else:
        trainable = {n: v.contiguous() for n, v in gathered[0].items()}
        optim_state = gathered[1]
        state["optimizer_layout"] = BY_NAME
    with atomic_folder(target) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        # state.json last: its presence marks a complete checkpoint.
        (tmp / "state.json").write_text(json.dumps(state) + "\n")
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(folder: str | Path, model, optimizer, scheduler, sharded: bool = False) -> tuple[int, list[dict]]:
    """Restore a checkpoint into model/optimizer/scheduler; returns (step, history).
    `sharded`: model and optimizer are an fsdp run's (every process loads the full files
    and keeps its shard)."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise BunnyError(f"{folder} is not a complete training checkpoint (no state.json)")
    state = json.loads((folder / "state.json").read_text())
    by_name = state.get("optimizer_layout") == BY_NAME
    params = dict(model.named_parameters())
    saved = load_file(str(folder / "trainable.safetensors"))
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise BunnyError(f"checkpoint {folder} does not match this recipe's trainable parameters "
                         f"(missing {missing[:5]}, unexpected {extra[:5]})")
    # weights_only: a checkpoint is data; nothing in it may run code when loaded.
    optim = torch.load(folder / "optim.pt", map_location="cpu", weights_only=True)
    if sharded:
        from bunny.train import sharding

        optim_state = optim["optimizer"] if by_name else by_name_state(optimizer, optim["optimizer"], params)
        sharding.load_full(model, optimizer, saved, optim_state)
    else:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        optimizer.load_state_dict(by_position_state(optimizer, optim["optimizer"], params) if by_name
                                  else optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    return int(state["step"]), list(state["history"])


def by_name_state(optimizer, state: dict, params: dict) -> dict:
    """An optimizer state dict keyed by position (optimizer.state_dict() of an unsharded run)
    keyed by parameter name instead, as the sharded loader takes it; the positions are those of
    this run's optimizer, whose groups are built alike."""
    ids = {id(p): n for n, p in params.items()}
    names = [ids[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in state["param_groups"] for i in g["params"]]
    if len(saved_ids) != len(names):
        raise BunnyError(f"the checkpoint's optimizer holds {len(saved_ids)} parameters, this run's {len(names)}")
    to_name = dict(zip(saved_ids, names))
    return {"state": {to_name[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [to_name[i] for i in g["params"]]} for g in state["param_groups"]]}


def by_position_state(optimizer, state: dict, params: dict) -> dict:
    """The inverse of by_name_state: a sharded run's optimizer state for an unsharded run."""
    ids = {id(p): n for n, p in params.items()}
    position = {ids[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    unknown = sorted(set(state["state"]) - set(position))
    if unknown:
        raise BunnyError(f"the checkpoint's optimizer state names parameters this run does not train: {unknown[:5]}")
    return {"state": {position[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in state["param_groups"]]}


def find_resume_point(output_dir: str | Path, resume: str) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise BunnyError(f"resume checkpoint not found: {path}")
    return path
