"""S2 multi-scale features (Shi et al., "When do we not need larger vision models?").

Images arrive at the largest scale. Each scale s is a bicubic resize to s x s, cut into
(s / base)^2 base-size crops (a chessboard), all crops of all scales run through the tower
as one batch per scale, each scale's crop features are stitched back into one grid,
area-pooled to the base grid, and the scales are concatenated on channels:
(N, T, C) per scale -> (N, T, C * len(scales)). Same arithmetic as the reference's wrapper.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from bunny.errors import BunnyError


def split_chessboard(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, H, W) -> (n*n*B, C, H/n, W/n), crops ordered row-major, batch inner."""
    _, _, height, width = x.shape
    h, w = height // n, width // n
    return torch.cat([x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(n) for j in range(n)], dim=0)


def merge_chessboard(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of split_chessboard: (n*n*B, C, h, w) -> (B, C, n*h, n*w)."""
    b = x.shape[0] // (n * n)
    rows = [torch.cat([x[(i * n + j) * b:(i * n + j + 1) * b] for j in range(n)], dim=-1) for i in range(n)]
    return torch.cat(rows, dim=-2)


def _to_grid(features: torch.Tensor) -> torch.Tensor:
    """(B, T, C) with T a square -> (B, C, sqrt T, sqrt T)."""
    side = math.isqrt(features.shape[1])
    if side * side != features.shape[1]:
        raise BunnyError(f"S2 needs a square token grid, got {features.shape[1]} tokens")
    return features.transpose(1, 2).reshape(features.shape[0], features.shape[2], side, side)


def s2_features(tower_fn: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor,
                scales: list[int]) -> torch.Tensor:
    """Multi-scale features (B, T_base, C * len(scales)) from images at the largest scale."""
    scales = sorted(scales)
    base = scales[0]
    if any(s % base for s in scales):
        raise BunnyError(f"S2 scales {scales} must be multiples of the smallest scale {base}")
    grids = []
    for size in scales:
        n = size // base
        x = F.interpolate(pixel_values.float(), size=(size, size), mode="bicubic").to(pixel_values.dtype)
        crops = split_chessboard(x, n)
        grids.append(merge_chessboard(_to_grid(tower_fn(crops)), n))
    out_size = grids[0].shape[-1]
    pooled = [F.interpolate(g.float(), size=(out_size, out_size), mode="area").to(g.dtype) for g in grids]
    merged = torch.cat(pooled, dim=1)  # (B, C * scales, h, w)
    return merged.flatten(2).transpose(1, 2)
