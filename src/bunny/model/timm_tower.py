"""EVA02-CLIP (and other timm ViTs) as a vision tower with Hugging Face-style outputs.

timm is imported only when such a tower is built, so SigLIP/CLIP users never need it.
The tower returns `hidden_states` like a transformers vision model: the patch embeddings
followed by each block's output, CLS first, so the shared feature rule applies unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedConfig


class TimmVisionConfig(PreTrainedConfig):
    model_type = "bunny_timm_vision"
    architecture: str = "eva02_large_patch14_clip_336"
    hidden_size: int = 1024
    image_size: int = 336
    patch_size: int = 14
    model_kwargs: dict | None = None  # extra timm.create_model arguments (tiny test configs)
    image_mean: list[float] | None = None
    image_std: list[float] | None = None


AutoConfig.register("bunny_timm_vision", TimmVisionConfig)


class TimmVisionTower(nn.Module):
    def __init__(self, config: TimmVisionConfig):
        super().__init__()
        import timm

        self.config = config
        kwargs = dict(config.model_kwargs or {})
        kwargs.setdefault("embed_dim", config.hidden_size)
        self.model = timm.create_model(
            config.architecture, pretrained=False, img_size=config.image_size, num_classes=0, **kwargs
        )
        if self.model.patch_embed.patch_size[0] != config.patch_size:
            raise ValueError(
                f"timm tower {config.architecture} has patch size {self.model.patch_embed.patch_size}, "
                f"config says {config.patch_size}"
            )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = True, **_):
        """Returns an object with `hidden_states`: (embeddings, block 1, ..., block N), (B, 1 + T, C)."""
        m = self.model
        x = m.patch_embed(pixel_values)
        x, rope = m._pos_embed(x)
        x = m.norm_pre(x)
        states = [x]
        for block in m.blocks:
            x = block(x, rope=rope)
            states.append(x)
        return SimpleNamespace(hidden_states=tuple(states), last_hidden_state=x)

    @classmethod
    def from_pretrained(cls, source: str) -> "TimmVisionTower":
        """A local folder holding `config.json` (TimmVisionConfig) and timm's `model.safetensors`."""
        from safetensors.torch import load_file

        folder = Path(source)
        config = TimmVisionConfig(**json.loads((folder / "config.json").read_text()))
        tower = cls(config)
        tower.model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
        return tower
