"""Prefill that runs a start shared by several prompts once.

Evaluation asks several questions about each image (MME two, POPE many, the demo six). Each
prompt is `<system> USER: <image tokens>\\n<question> ASSISTANT:`, and the image tokens are
most of it, so prefilling every prompt whole repeats the same work once per question.

Here the rows of a left-padded batch are grouped by their images (pixel-for-pixel equal) and,
inside a group, by the longest common start of their token ids. Each group's start runs once;
its KV cache is copied to the group's rows; then each row's remaining tokens run on top of it.
The start is cut so that it ends before the last token (every row needs a logit of its own)
and never inside an image. A row's positions and what each token attends to are those of the
unshared prefill, so the result is the same up to float rounding.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from bunny.model.modeling import positions_from_mask


def common_start(rows: list[list[int]]) -> int:
    """Length of the longest start all rows share."""
    n = min(len(r) for r in rows)
    first = rows[0]
    for i in range(n):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return n


def plan_groups(rows: list[list[int]], image_keys: list[bytes], image_token: int, per_image: int
                ) -> tuple[list[int], list[int]]:
    """For each row: its group (rows with equal images and a shared start) and the length of
    the start the group runs once. Groups are numbered in order of first appearance."""
    by_key: dict[bytes, list[int]] = {}
    for i, key in enumerate(image_keys):
        by_key.setdefault(key, []).append(i)
    group_of = [0] * len(rows)
    start_of_group: list[int] = []
    for members in by_key.values():
        grouped = [rows[i] for i in members]
        p = min(common_start(grouped), min(len(r) for r in grouped) - 1)
        cut = sum(1 for t in grouped[0][:p] if t == image_token) % per_image
        p -= cut  # never end the shared start inside an image's tokens
        for i in members:
            group_of[i] = len(start_of_group)
        start_of_group.append(max(p, 0))
    return group_of, start_of_group


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, device=device)
            mask[i, width - len(r):] = 1
    return ids, mask


def prefill_shared(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor,
                   pixel_values: torch.Tensor | None):
    """Prefill a left-padded batch, running shared starts once. Returns (output with the
    last position's logits and the KV cache, the attention mask to decode on)."""
    lm = model.language_model
    image_token, per_image = model.config.image_token_index, model.config.image_seq_length
    rows = [r[m.bool()].tolist() for r, m in zip(input_ids, attention_mask)]
    n_images = [sum(1 for t in r if t == image_token) // per_image for r in rows]
    offsets = [0]
    for n in n_images:
        offsets.append(offsets[-1] + n)
    images = [pixel_values[offsets[i]:offsets[i + 1]] if n_images[i] else None for i in range(len(rows))]
    keys = [b"" if img is None else img.detach().cpu().numpy().tobytes() for img in images]
    group_of, start = plan_groups(rows, keys, image_token, per_image)

    # One prefix row per group. A group without a shared start gets one placeholder token
    # so that no row attends to nothing; it is hidden from the rows afterwards.
    first_row = {g: group_of.index(g) for g in range(len(start))}
    prefix_rows = [rows[first_row[g]][:p] if p else [0] for g, p in enumerate(start)]
    prefix_ids, prefix_mask = _left_pad(prefix_rows, 0, input_ids.device)
    prefix_pixels = [images[first_row[g]][:_count_images(prefix_rows[g], image_token, per_image)]
                     for g, p in enumerate(start) if p and images[first_row[g]] is not None]
    cache = DynamicCache(config=lm.config)
    lm(inputs_embeds=model.embed_inputs(prefix_ids, _cat(prefix_pixels)), attention_mask=prefix_mask,
       position_ids=positions_from_mask(prefix_mask), cache=cache, use_cache=True, logits_to_keep=1)
    index = torch.tensor(group_of, device=input_ids.device)
    cache.batch_select_indices(index)
    visible = prefix_mask.clone()
    visible[torch.tensor([p == 0 for p in start], device=input_ids.device)] = 0
    visible = visible[index]

    # The rest of each row, left-padded, on top of its group's start.
    rest_rows = [r[start[g]:] for r, g in zip(rows, group_of)]
    rest_ids, rest_mask = _left_pad(rest_rows, 0, input_ids.device)
    rest_pixels = [images[i][_count_images(r[:start[group_of[i]]], image_token, per_image):]
                   for i, r in enumerate(rows) if images[i] is not None]
    mask = torch.cat([visible, rest_mask], dim=1)
    out = lm(inputs_embeds=model.embed_inputs(rest_ids, _cat(rest_pixels)), attention_mask=mask,
             position_ids=positions_from_mask(mask)[:, -rest_ids.shape[1]:], cache=cache, use_cache=True,
             logits_to_keep=1)
    return out, mask


def _count_images(ids: list[int], image_token: int, per_image: int) -> int:
    return sum(1 for t in ids if t == image_token) // per_image


def _cat(chunks: list[torch.Tensor]) -> torch.Tensor | None:
    chunks = [c for c in chunks if c is not None and c.shape[0]]
    return torch.cat(chunks) if chunks else None
