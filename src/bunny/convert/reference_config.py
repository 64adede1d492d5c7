"""What a reference (BAAI Bunny) checkpoint folder is: its layout, its LLM's config and the
Bunny settings its `config.json` records.

The layout is decided by the files present, the template by the config's `model_type`;
never by substrings of the folder name (the reference looked for "lora" in the path).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PreTrainedConfig

from bunny.errors import BunnyError
from bunny.model.hub import local_or_hub
from bunny.model.templates import TEMPLATE_BY_REFERENCE_MODEL_TYPE
from bunny.model.towers import resolve_tower_source

# The reference's model types and the transformers model type of the LLM inside.
# MiniCPM is None: transformers has no implementation of it (see `text_config_from`).
LLM_TYPE_BY_REFERENCE_MODEL_TYPE = {
    "bunny-phi": "phi",
    "bunny-phi3": "phi3",
    "bunny-stablelm": "stablelm",
    "bunny-qwen2": "qwen2",
    "bunny-llama": "llama",
    "bunny-minicpm": None,
}
# Keys the reference adds to its LLM's config; they are Bunny settings, not the LLM's.
REFERENCE_KEYS = (
    "mm_vision_tower", "mm_projector_type", "mm_hidden_size", "use_mm_proj", "image_aspect_ratio",
    "tokenizer_padding_side", "tokenizer_model_max_length", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "mm_projector_lr", "use_s2", "s2_scales", "unfreeze_vision_tower",
    "continuous_training", "mm_vision_select_layer", "mm_vision_select_feature",
)
# Bookkeeping keys of a saved config that say nothing about the architecture. `auto_map`
# points at the hub's remote code, which bunny never runs.
BOOKKEEPING_KEYS = ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version")
# StableLM's reference config is the older "stablelm_epoch" one; its names differ.
RENAMED_KEYS = {"stablelm": {"rope_pct": "partial_rotary_factor", "norm_eps": "layer_norm_eps"}}
DEFAULT_S2_SCALES = "384,768,1152"  # the reference's default when use_s2 is set

STAGE1, LORA, MERGED = "stage-1", "lora", "merged"


@dataclass
class ReferenceCheckpoint:
    folder: Path
    config: dict
    layout: str  # STAGE1, LORA or MERGED

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def template(self) -> str:
        # Stage 1 trains with `plain`; everything after it uses the model type's template.
        return "plain" if self.layout == STAGE1 else TEMPLATE_BY_REFERENCE_MODEL_TYPE[self.model_type]

    @property
    def unfreeze_vision_tower(self) -> bool:
        return bool(self.config.get("unfreeze_vision_tower", False))

    def tower_source(self) -> str:
        """The local folder of `mm_vision_tower`: a path (relative ones against the checkpoint
        folder), a tower preset, or a hub id (fetched into the hub cache on first use)."""
        tower = self.config.get("mm_vision_tower")
        if not tower:
            raise BunnyError(f"{self.folder / 'config.json'} has no mm_vision_tower")
        try:
            return resolve_tower_source(_resolve_path(tower, self.folder))
        except BunnyError as exc:
            raise BunnyError(f"{exc} (the mm_vision_tower of {self.folder / 'config.json'})") from None

    def base_source(self, model_base: str | None) -> str:
        """The local folder of the base LLM of a stage-1 or LoRA folder: `model_base`, else the
        config's `_name_or_path`; a path (relative ones against the checkpoint folder) or a hub id."""
        base = model_base or self.config.get("_name_or_path")
        if not base or (not model_base and Path(base).resolve() == self.folder.resolve()):
            raise BunnyError(
                f"{self.folder} is a {self.layout} checkpoint: it holds no LLM weights; pass model_base "
                "(--model-base) naming the base LLM folder or hub id it was trained on"
            )
        how = "model_base" if model_base else f"_name_or_path in {self.folder / 'config.json'}"
        try:
            folder = local_or_hub(_resolve_path(base, self.folder), what=f"base LLM ({how})")
        except BunnyError as exc:
            raise BunnyError(f"{exc}; pass model_base (--model-base) naming the base LLM") from None
        if not (folder / "config.json").is_file():
            raise BunnyError(f"the base LLM {base!r} ({how}) is not a model folder (no config.json); pass model_base")
        return str(folder)

    def s2_scales(self) -> list[int] | None:
        if not self.config.get("use_s2", False):
            return None
        scales = self.config.get("s2_scales", DEFAULT_S2_SCALES)
        try:
            return sorted(int(s) for s in str(scales).split(","))
        except ValueError:
            raise BunnyError(f"{self.folder / 'config.json'}: s2_scales {scales!r} is not a list of sizes") from None

    def bunny_settings(self) -> dict:
        """BunnyConfig fields recorded by the reference."""
        cfg = self.config
        max_length = cfg.get("tokenizer_model_max_length") or 2048
        return dict(
            vision_tower=str(cfg.get("mm_vision_tower", "")),
            template=self.template,
            image_aspect_ratio=cfg.get("image_aspect_ratio") or "pad",
            tokenizer_padding_side=cfg.get("tokenizer_padding_side") or "right",
            tokenizer_model_max_length=int(min(max_length, 2**31 - 1)),
            s2_scales=self.s2_scales(),
            projector_trained=True,
        )

    def text_config(self) -> PreTrainedConfig:
        return text_config_from(self.config, self.folder)


def read_reference(folder: Path) -> ReferenceCheckpoint:
    folder = Path(folder)
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise BunnyError(f"{folder} holds no config.json; not a reference checkpoint") from None
    except ValueError as exc:
        raise BunnyError(f"{config_file} is not valid JSON ({exc})") from None
    model_type = config.get("model_type")
    if model_type not in LLM_TYPE_BY_REFERENCE_MODEL_TYPE:
        raise BunnyError(
            f"{config_file}: model_type {model_type!r} is not a reference Bunny type; "
            f"known: {', '.join(sorted(LLM_TYPE_BY_REFERENCE_MODEL_TYPE))}"
        )
    return ReferenceCheckpoint(folder, config, detect_layout(folder))


def detect_layout(folder: Path) -> str:
    from bunny.convert.weights import shard_files

    if (folder / "adapter_config.json").is_file():
        if not (folder / "non_lora_trainables.bin").is_file():
            raise BunnyError(f"{folder} holds a LoRA adapter but no non_lora_trainables.bin (projector weights)")
        return LORA
    if shard_files(folder):
        return MERGED
    if (folder / "mm_projector.bin").is_file():
        return STAGE1
    raise BunnyError(
        f"{folder} matches no reference layout: expected mm_projector.bin (stage 1), adapter_config.json + "
        "non_lora_trainables.bin (LoRA), or model shards (*.safetensors / pytorch_model*.bin)"
    )


def text_config_from(config: dict, folder: Path) -> PreTrainedConfig:
    """The LLM's own transformers config, from a reference config.json."""
    model_type = config["model_type"]
    llm_type = LLM_TYPE_BY_REFERENCE_MODEL_TYPE[model_type]
    if llm_type is None:
        raise BunnyError(
            f"{folder}: {model_type} checkpoints hold a MiniCPM LLM, which has no implementation in "
            "transformers; the reference runs it through trust_remote_code (its own modeling file), "
            "which bunny never does. Convert the LLM to a supported architecture first."
        )
    fields = {k: v for k, v in config.items() if k not in REFERENCE_KEYS and k not in BOOKKEEPING_KEYS}
    for old, new in RENAMED_KEYS.get(llm_type, {}).items():
        if old in fields:
            fields.setdefault(new, fields.pop(old))
    return AutoConfig.for_model(llm_type, **fields)


def _resolve_path(name: str, folder: Path) -> str:
    """A relative path is taken relative to the checkpoint folder when it exists there."""
    path = Path(name)
    if not path.is_absolute() and (folder / path).exists():
        return str((folder / path).resolve())
    return name
