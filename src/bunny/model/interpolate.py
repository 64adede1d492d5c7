"""Running a vision tower at a new resolution by interpolating its position embeddings
(paper, Tab. 9: SigLIP 384 -> 448, 729 -> 1024 tokens).

The learned position embeddings form a (grid x grid) map of vectors; they are resized to
the new grid with bicubic interpolation (align_corners=False, as transformers' own
`interpolate_pos_encoding` does), the CLS position of CLIP towers kept as is. The tower is
changed in place and `vision_config.image_size` set to the new size, so the new size is
saved with the checkpoint, a reload builds the tower at that size, and `image_seq_length`
and the processor's image size follow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bunny.errors import BunnyError
from bunny.model.config import TOWER_HAS_CLS


def interpolate_grid(weight: torch.Tensor, old_grid: int, new_grid: int, n_prefix: int) -> torch.Tensor:
    """(n_prefix + old_grid^2, C) position table -> (n_prefix + new_grid^2, C); prefix rows (CLS) kept."""
    prefix, grid = weight[:n_prefix], weight[n_prefix:]
    if grid.shape[0] != old_grid * old_grid:
        raise BunnyError(f"the tower has {grid.shape[0]} patch positions, expected a {old_grid}x{old_grid} grid")
    c = grid.shape[1]
    x = grid.float().reshape(1, old_grid, old_grid, c).permute(0, 3, 1, 2)  # (1, C, g, g)
    x = F.interpolate(x, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(new_grid * new_grid, c).to(weight.dtype)
    return torch.cat([prefix, x], dim=0)


def _embeddings(tower: nn.Module):
    # transformers 5 puts `embeddings` on the tower itself; older versions under `vision_model`.
    embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
    if embeddings is None or not isinstance(getattr(embeddings, "position_embedding", None), nn.Embedding):
        raise BunnyError(f"position-embedding interpolation supports transformers' SigLIP and CLIP towers, "
                         f"not {type(tower).__name__}")
    return embeddings


@torch.no_grad()
def interpolate_tower(tower: nn.Module, image_size: int) -> nn.Module:
    """Resize a SigLIP/CLIP tower's position embeddings for `image_size` inputs, in place."""
    config = tower.config
    patch = config.patch_size
    if image_size <= 0 or image_size % patch:
        raise BunnyError(f"image size {image_size} must be a positive multiple of the tower's patch size {patch}")
    old_size = config.image_size if isinstance(config.image_size, int) else int(config.image_size[0])
    if image_size == old_size:
        return tower  # nothing to resize: the tower stays bit-identical
    emb = _embeddings(tower)
    n_prefix = int(TOWER_HAS_CLS.get(config.model_type, False))
    weight = interpolate_grid(emb.position_embedding.weight, old_size // patch, image_size // patch, n_prefix)
    old = emb.position_embedding
    emb.position_embedding = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
    emb.position_embedding.weight.copy_(weight)
    emb.position_embedding.weight.requires_grad_(old.weight.requires_grad)
    emb.num_patches = (image_size // patch) ** 2
    emb.num_positions = weight.shape[0]
    emb.image_size = image_size
    emb.register_buffer("position_ids", torch.arange(weight.shape[0], device=weight.device).expand((1, -1)),
                        persistent=False)
    config.image_size = image_size
    return tower


def set_tower_image_size(model, image_size: int, processor=None):
    """Run `model`'s tower at `image_size`: interpolate, update the config (saved with the
    checkpoint: vision_config.image_size, image_seq_length) and the processor if given."""
    if model.config.s2_scales:
        raise BunnyError("cannot interpolate the tower of an S2 model: its crop size is the smallest S2 scale; "
                         "set s2_scales instead")
    interpolate_tower(model.vision_tower, image_size)
    model.config.vision_config.image_size = image_size
    model.config.image_seq_length = model.config.derive_image_seq_length()
    if processor is not None:
        image_processor = processor.image_processor
        if "shortest_edge" in (image_processor.size or {}):  # CLIP: resize the short side, then crop
            image_processor.size = {"shortest_edge": image_size}
            image_processor.crop_size = {"height": image_size, "width": image_size}
        else:
            image_processor.size = {"height": image_size, "width": image_size}
        processor.image_seq_length = model.config.image_seq_length
    return model
