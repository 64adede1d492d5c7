"""Batching tokenised conversations: pad ids/labels, build the attention mask, stack images."""
from __future__ import annotations

import torch

from bunny.data.llava import IGNORE_INDEX
from bunny.errors import BunnyError


def collate(samples: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """samples from `ConversationDataset` -> model inputs.

    input_ids / labels / attention_mask: (B, T_max); pixel_values: (N_images, 3, H, W) in
    sample order (the order of the placeholders), absent when no sample has an image.
    """
    if not samples:
        raise BunnyError("cannot collate an empty batch")
    if padding_side not in ("left", "right"):
        raise BunnyError(f"padding side {padding_side!r} is not valid; choose left or right")
    width = max(len(s["input_ids"]) for s in samples)
    n = len(samples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(samples):
        length = len(s["input_ids"])
        span = slice(width - length, width) if padding_side == "left" else slice(0, length)
        input_ids[i, span] = s["input_ids"]
        labels[i, span] = s["labels"]
        mask[i, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry loss (labels shifted by one, as the model does)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
