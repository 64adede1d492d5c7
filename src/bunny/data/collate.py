"""Batching tokenised conversations: pad ids/labels, build the attention mask, stack images;
or, with `pack_to`, pack them (`bunny.data.packing`)."""
from __future__ import annotations

import torch

from bunny.data.llava import IGNORE_INDEX
from bunny.errors import BunnyError


def collate(samples: list[dict], pad_token_id: int, padding_side: str = "right", pack_to: int = 0,
            layout: str = "mask") -> dict:
    """samples from `ConversationDataset` -> model inputs.

    input_ids / labels / attention_mask: (B, T_max); pixel_values: (N_images, 3, H, W) in
    sample order (the order of the placeholders), absent when no sample has an image.
    `pack_to` > 0: the samples packed into rows of at most that many tokens instead, with
    `layout` "mask" or "varlen" (`bunny.data.packing.pack`).
    """
    if not samples:
        raise BunnyError("cannot collate an empty batch")
    if pack_to:
        from bunny.data.packing import pack

        if padding_side != "right":
            raise BunnyError("packed samples are laid out left to right; padding_side must be right")
        return pack(samples, pad_token_id, pack_to, layout)
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
    if any("segment_ids" in s for s in samples):
        if padding_side != "right":
            raise BunnyError("samples with independent turns are collated with right padding only")
        batch.update(segment_mask(samples, width))
    pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def segment_mask(samples: list[dict], width: int) -> dict:
    """4-D attention mask and position ids for samples with independent turns (see
    `tokenize_independent_turns`): a token sees earlier tokens of its own segment and of the
    shared prefix (segment 0). A padding row sees only the first token (no empty softmax
    row); `mask.diagonal(...).sum()` therefore counts real tokens."""
    n = len(samples)
    segments = torch.full((n, width), -1, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(samples):
        length = len(s["input_ids"])
        seg = s.get("segment_ids")
        segments[i, :length] = seg if seg is not None else 0  # a plain sample is all prefix
        positions[i, :length] = s["position_ids"] if seg is not None else torch.arange(length)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]
    to_prefix = (segments == 0)[:, None, :]
    real = (segments >= 0)
    allowed = causal & (same | to_prefix) & real[:, :, None] & real[:, None, :]
    allowed[:, :, 0] |= ~real  # padding rows look at token 0 only
    return {"attention_mask": allowed[:, None], "position_ids": positions}


def real_tokens(batch: dict) -> int:
    """Non-padding tokens of a collated batch (2-D mask, or a 4-D mask of independent turns
    or packing; a packed batch without a mask has no padding)."""
    if "attention_mask" not in batch:
        return int(batch["input_ids"].numel())
    mask = batch["attention_mask"]
    return int(mask.sum() if mask.ndim == 2 else mask.diagonal(dim1=-2, dim2=-1).sum())


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry loss (labels shifted by one, as the model does)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
