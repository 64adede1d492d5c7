"""Projectors from vision features (mm_hidden) to the LLM's hidden size, by exact name.

Module layouts match the reference so its `mm_projector.*` keys load unchanged:
`linear` is a bare nn.Linear (`mm_projector.weight`); `mlpNx_gelu` is an nn.Sequential of
Linear, GELU, Linear, ... (`mm_projector.0.weight`, `mm_projector.2.weight`, ...).
"""
from __future__ import annotations

import re

from torch import nn

from bunny.errors import BunnyError

_MLP = re.compile(r"^mlp([1-9][0-9]*)x_gelu$")
FIXED_NAMES = ("linear", "identity")
VALID_NAMES_TEXT = "linear, identity, mlp2x_gelu (default), mlpNx_gelu for any depth N >= 1"


def mlp_depth(name: str) -> int | None:
    """Depth N of an `mlpNx_gelu` name, or None when the name is not of that form."""
    match = _MLP.match(name)
    return int(match.group(1)) if match else None


def check_projector_name(name: str) -> None:
    if name not in FIXED_NAMES and mlp_depth(name) is None:
        raise BunnyError(f"unknown projector {name!r}; valid names: {VALID_NAMES_TEXT}")


def build_projector(name: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    check_projector_name(name)
    if name == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    if name == "identity":
        if mm_hidden_size != hidden_size:
            raise BunnyError(
                f"projector 'identity' needs equal sizes, got vision {mm_hidden_size} vs LLM {hidden_size}"
            )
        return nn.Identity()
    depth = mlp_depth(name)
    layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)
