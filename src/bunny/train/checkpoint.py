"""Resumable training checkpoints, written atomically.

A checkpoint holds only what training changes: the trainable parameters (safetensors),
the optimizer and scheduler states, the step, and the loss history. It is written into a
temporary sibling folder and renamed into place, so a run killed while saving leaves the
previous checkpoint intact and never a half-written one under a real name.
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


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, scheduler, history: list[dict],
                    keep: int) -> Path:
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{PREFIX}{step:07d}"
    with atomic_folder(target) as tmp:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        # state.json last: its presence marks a complete checkpoint.
        (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}) + "\n")
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(folder: str | Path, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore a checkpoint into model/optimizer/scheduler; returns (step, history)."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise BunnyError(f"{folder} is not a complete training checkpoint (no state.json)")
    state = json.loads((folder / "state.json").read_text())
    params = dict(model.named_parameters())
    saved = load_file(str(folder / "trainable.safetensors"))
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise BunnyError(f"checkpoint {folder} does not match this recipe's trainable parameters "
                         f"(missing {missing[:5]}, unexpected {extra[:5]})")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    # weights_only: a checkpoint is data; nothing in it may run code when loaded.
    optim = torch.load(folder / "optim.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    return int(state["step"]), list(state["history"])


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
