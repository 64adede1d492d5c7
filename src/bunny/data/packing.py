"""Multimodal sequence packing: the samples of a micro-batch share rows instead of each
padding its own row to the longest.

A micro-batch is the same samples as without packing (the sample order and the steps are
unchanged, so a checkpoint's step means the same samples, and the loss is the same mean over
the same answer tokens); only their layout changes. Lengths count every token, image
placeholders included (the processor expands each `<image>` to its run of placeholders
before batching).

Two layouts, chosen by the model's attention implementation:

- sdpa / eager: samples grouped greedily into rows of at most `capacity` tokens
  (`plan_rows`), with a 4-D boolean mask (rows, 1, T, T) that lets a token see earlier
  tokens of its own sample only (and, for independent-turn samples, of its own segment and
  the shared prefix), and position ids restarting at 0 in every sample.
- flash_attention_2 / 3: every sample in one row without padding and without a mask;
  flash-attention's variable-length path finds the samples from the position ids (each
  restarts at 0), as transformers does for padding-free batches. Needs a GPU and the
  flash-attn package.

Labels stay with their tokens. The model predicts token t from position t - 1 of the row, so
each sample's first token would be predicted from the previous sample's last token: it is
never a target, as in the sample's own padded row, where nothing precedes it.
"""
from __future__ import annotations

import sys

import torch

from bunny.data.llava import IGNORE_INDEX
from bunny.errors import BunnyError

# ConversationDataset's max_length when packing: tokenise whole, then `check_packable`
# refuses (by name) what does not fit a row, instead of cutting it.
UNCUT = sys.maxsize
MASK_ATTENTION = ("sdpa", "eager")
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def check_packable(lengths: list[int], ids: list[str], capacity: int) -> None:
    """BunnyError naming every sample longer than `capacity` tokens (the first five shown)."""
    too_long = [(i, sid, n) for i, (sid, n) in enumerate(zip(ids, lengths)) if n > capacity]
    if too_long:
        shown = ", ".join(f"sample {sid!r} (index {i}): {n} tokens" for i, sid, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        raise BunnyError(f"packing: {len(too_long)} sample(s) longer than model_max_length {capacity} "
                         f"(image tokens included): {shown}{more}. Packing never cuts a sample; raise "
                         "model_max_length or shorten or drop these samples")


def plan_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices into `lengths` grouped into rows of at most `capacity` tokens each.

    First-fit decreasing gives the number of rows; the same number of rows is then filled
    longest-first into the emptiest row, which narrows the widest row (the batch's width)
    when it fits, else first-fit's rows are kept. Ties go to the lower index, so the plan is
    a function of the lengths alone. Each row lists its samples in ascending index order.
    """
    if capacity < 1:
        raise BunnyError(f"packing capacity must be >= 1 token, got {capacity}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise BunnyError(f"packing: sample {i} has {n} tokens; a row holds 1 to {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        row = next((r for r, load in enumerate(loads) if load + lengths[i] <= capacity), None)
        if row is None:
            rows.append([])
            loads.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        loads[row] += lengths[i]
    balanced: list[list[int]] = [[] for _ in rows]
    balanced_loads = [0] * len(rows)
    for i in order:
        row = min(range(len(rows)), key=lambda r: (balanced_loads[r], r))
        if balanced_loads[row] + lengths[i] > capacity:
            balanced = []
            break
        balanced[row].append(i)
        balanced_loads[row] += lengths[i]
    if balanced and max(balanced_loads) < max(loads):
        rows = balanced
    return sorted((sorted(r) for r in rows), key=lambda r: r[0])


def attention_layout(model) -> str:
    """"mask" or "varlen": how packed samples are kept apart for this model's LLM."""
    impl = model.language_model.config._attn_implementation
    if impl in MASK_ATTENTION:
        return "mask"
    if impl in VARLEN_ATTENTION:
        return "varlen"
    raise BunnyError(f"packing needs the LLM's attention to be one of {', '.join(MASK_ATTENTION + VARLEN_ATTENTION)}; "
                     f"it is {impl!r}")


def pack(samples: list[dict], pad_token_id: int, capacity: int, layout: str = "mask") -> dict:
    """samples from `ConversationDataset` -> packed model inputs.

    layout "mask": input_ids / labels / position_ids (R, T) with R rows of at most
    `capacity` tokens (T = the fullest row), attention_mask (R, 1, T, T) bool.
    layout "varlen": input_ids / labels / position_ids (1, total tokens), no attention_mask.
    pixel_values: (N_images, 3, H, W) in the order of the placeholders in the rows, absent
    when no sample has an image.
    """
    if not samples:
        raise BunnyError("cannot pack an empty batch")
    if layout not in ("mask", "varlen"):
        raise BunnyError(f"packing layout {layout!r} is not valid; choose mask or varlen")
    lengths = [len(s["input_ids"]) for s in samples]
    check_packable(lengths, [str(s.get("id", i)) for i, s in enumerate(samples)], capacity)
    if layout == "varlen":
        if any("segment_ids" in s for s in samples):
            raise BunnyError("packing independent-turn samples needs sdpa or eager attention: flash-attention's "
                             "variable-length path cannot let every turn see the shared prefix")
        rows = [list(range(len(samples)))]
    else:
        rows = plan_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    owner = torch.full((n, width), -1, dtype=torch.long)  # which sample a token is; -1 = padding
    segments = torch.zeros((n, width), dtype=torch.long)  # independent turns: 0 = shared prefix
    pixels = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            s, span = samples[i], slice(start, start + lengths[i])
            input_ids[r, span] = s["input_ids"]
            labels[r, span] = s["labels"]
            labels[r, start] = IGNORE_INDEX  # predicted from the previous sample: never a target
            positions[r, span] = s["position_ids"] if "segment_ids" in s else torch.arange(lengths[i])
            if "segment_ids" in s:
                segments[r, span] = s["segment_ids"]
            owner[r, span] = i
            if s.get("pixel_values") is not None:
                pixels.append(s["pixel_values"])
            start += lengths[i]
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    if layout == "mask":
        batch["attention_mask"] = packed_mask(owner, segments)
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def packed_mask(owner: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """(R, 1, T, T) bool: query q sees key k iff k <= q, both belong to the same sample, and
    k is in q's segment or the shared prefix (segment 0). A padding row sees only token 0 (no
    empty softmax row), so the mask's diagonal counts the real tokens."""
    width = owner.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    real = owner >= 0
    same_sample = owner[:, :, None] == owner[:, None, :]
    same_segment = (segments[:, :, None] == segments[:, None, :]) | (segments == 0)[:, None, :]
    allowed = causal & same_sample & same_segment & real[:, :, None]
    allowed[:, :, 0] |= ~real
    return allowed[:, None]
