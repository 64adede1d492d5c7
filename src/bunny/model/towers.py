"""Vision towers: presets by exact name, any Hugging Face vision model by path or hub id, and the
feature rule (which hidden layer, whether to drop CLS) shared by all of them.

A tower is kept as the Hugging Face module itself (e.g. `SiglipVisionModel`), so its
weights keep their own names under `vision_tower.` and load from the reference unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, PreTrainedConfig

from bunny.errors import BunnyError
from bunny.model.hub import local_or_hub
from bunny.registry import Registry


@dataclass(frozen=True)
class TowerPreset:
    """A named tower: where its weights live and the config to build it without them."""

    hub_id: str
    model_type: str
    config: dict = field(default_factory=dict)


TOWER_PRESETS: Registry[TowerPreset] = Registry("vision tower")
TOWER_PRESETS.add(
    "siglip-so400m-patch14-384",
    TowerPreset(
        "google/siglip-so400m-patch14-384",
        "siglip_vision_model",
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
             image_size=384, patch_size=14),
    ),
)
TOWER_PRESETS.add(
    "clip-vit-large-patch14-336",
    TowerPreset(
        "openai/clip-vit-large-patch14-336",
        "clip_vision_model",
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             image_size=336, patch_size=14, projection_dim=768),
    ),
)
# EVA02-CLIP-L/14-336 through timm (see bunny.model.timm_tower).
TOWER_PRESETS.add(
    "eva02-clip-l-14-336",
    TowerPreset(
        "timm/eva02_large_patch14_clip_336.merged2b",
        "bunny_timm_vision",
        dict(architecture="eva02_large_patch14_clip_336", hidden_size=1024, image_size=336, patch_size=14),
    ),
)


def preset_vision_config(name: str) -> PreTrainedConfig:
    """The config of a preset tower, for building it with random weights (no download)."""
    preset = TOWER_PRESETS.get(name)
    if preset.model_type == "bunny_timm_vision":
        from bunny.model.timm_tower import TimmVisionConfig

        return TimmVisionConfig(**preset.config)
    return AutoConfig.for_model(preset.model_type, **preset.config)


def resolve_tower_source(name_or_path: str, revision: str | None = None) -> str:
    """The local folder of a tower: a preset name maps to its hub id, and a hub id to its
    cached snapshot (fetched on first use); a local folder is itself."""
    source = TOWER_PRESETS.get(name_or_path).hub_id if name_or_path in TOWER_PRESETS else name_or_path
    return str(local_or_hub(source, revision, what="vision tower"))


def load_vision_config(name_or_path: str, revision: str | None = None) -> PreTrainedConfig:
    """Vision config of a tower given by preset name, hub id or folder. A full CLIP/SigLIP
    checkpoint (image + text) yields its vision part."""
    config = AutoConfig.from_pretrained(resolve_tower_source(name_or_path, revision))
    return getattr(config, "vision_config", None) or config


def build_vision_model(vision_config: PreTrainedConfig) -> nn.Module:
    """A tower with random weights, from its config."""
    if vision_config.model_type == "bunny_timm_vision":
        from bunny.model.timm_tower import TimmVisionTower

        return TimmVisionTower(vision_config)
    return AutoModel.from_config(vision_config)


def load_vision_model(name_or_path: str, dtype=None, revision: str | None = None) -> nn.Module:
    """A tower with its pretrained weights (hub id, preset name or local folder)."""
    source = resolve_tower_source(name_or_path, revision)
    config = load_vision_config(source)
    if config.model_type == "bunny_timm_vision":
        from bunny.model.timm_tower import TimmVisionTower

        return TimmVisionTower.from_pretrained(source)
    return AutoModel.from_pretrained(source, config=config, dtype=dtype)


def load_image_processor(name_or_path: str, revision: str | None = None):
    """The tower's image processor on transformers' PIL backend, as the reference used it."""
    return AutoImageProcessor.from_pretrained(resolve_tower_source(name_or_path, revision), backend="pil")


def select_features(hidden_states: tuple[torch.Tensor, ...], layer: int, select: str) -> torch.Tensor:
    """(B, T, C) features of one hidden layer; `patch` drops the leading CLS token."""
    if not -len(hidden_states) <= layer < len(hidden_states):
        raise BunnyError(f"vision_feature_layer {layer} is out of range for a tower with {len(hidden_states)} hidden states")
    features = hidden_states[layer]
    return features[:, 1:] if select == "patch" else features


def tower_features(tower: nn.Module, pixel_values: torch.Tensor, layer: int, select: str) -> torch.Tensor:
    """Run the tower and return selected patch features, (B, T, C)."""
    out = tower(pixel_values, output_hidden_states=True)
    return select_features(out.hidden_states, layer, select)
