"""`BunnyConfig`: one typed config, saved with every checkpoint, composed of the vision
tower's and the LLM's own Hugging Face configs plus the few fields that join them."""
from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from bunny.errors import BunnyError
from bunny.model.projectors import check_projector_name
from bunny.model.templates import TEMPLATES

# How patch features are taken from each tower family, keyed by the vision config's exact
# model_type (never by a substring of a path). "full": every token (SigLIP has no CLS);
# "patch": drop the leading CLS token (CLIP, EVA-CLIP), as the reference does.
FEATURE_SELECT_BY_TOWER = {
    "siglip_vision_model": "full",
    "clip_vision_model": "patch",
    "bunny_timm_vision": "patch",
}
FEATURE_SELECT_CHOICES = ("full", "patch")
# Whether the tower's sequence starts with a CLS token (needed to count image tokens).
TOWER_HAS_CLS = {"siglip_vision_model": False, "clip_vision_model": True, "bunny_timm_vision": True}
IMAGE_MODES = ("pad", "square")
PADDING_SIDES = ("left", "right")


class BunnyConfig(PreTrainedConfig):
    """Vision tower -> projector -> causal LM.

    `vision_feature_select` defaults by tower family (table above); `image_seq_length` is
    derived from the tower (tokens each image occupies in the LLM's sequence).
    """

    model_type = "bunny"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }
    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    vision_tower: str = ""  # where the tower came from (registry name, hub id or path); informational
    vision_feature_layer: int = -2
    vision_feature_select: str | None = None
    projector_type: str = "mlp2x_gelu"
    image_token_index: int | None = None
    template: str = "bunny"
    image_aspect_ratio: str = "pad"
    tokenizer_padding_side: str = "right"
    tokenizer_model_max_length: int = 2048
    image_seq_length: int | None = None  # tokens per image; derived for known tower types
    s2_scales: list[int] | None = None  # multi-scale (S2) image sizes; None = single scale
    # Average k x k neighbouring patch tokens before the projector: k*k times fewer image
    # tokens for the LLM (1 = every patch token, as the reference).
    image_token_pool: int = 1
    tie_word_embeddings: bool = False
    # False for a freshly composed model: its projector is random, so images mean nothing yet.
    projector_trained: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if self.vision_feature_select is None:
            tower_type = self.vision_config.model_type
            if tower_type not in FEATURE_SELECT_BY_TOWER:
                raise BunnyError(
                    f"vision tower type {tower_type!r} has no known feature rule; pass "
                    f"vision_feature_select as one of {FEATURE_SELECT_CHOICES} "
                    f"(known tower types: {', '.join(sorted(FEATURE_SELECT_BY_TOWER))})"
                )
            self.vision_feature_select = FEATURE_SELECT_BY_TOWER[tower_type]
        self.validate_fields()

    def validate_fields(self) -> None:
        check_projector_name(self.projector_type)
        _check_choice("vision_feature_select", self.vision_feature_select, FEATURE_SELECT_CHOICES)
        _check_choice("template", self.template, sorted(TEMPLATES))
        _check_choice("image_aspect_ratio", self.image_aspect_ratio, IMAGE_MODES)
        _check_choice("tokenizer_padding_side", self.tokenizer_padding_side, PADDING_SIDES)
        if not isinstance(self.image_token_pool, int) or self.image_token_pool < 1:
            raise BunnyError(f"BunnyConfig.image_token_pool must be an integer >= 1, got {self.image_token_pool!r}")
        if self.image_token_index is None:
            # One id past the LLM's vocabulary: never a real token, never generated.
            self.image_token_index = self.text_config.vocab_size
        if self.image_seq_length is None:
            self.image_seq_length = self.derive_image_seq_length()

    @property
    def base_image_size(self) -> int:
        size = self.vision_config.image_size
        return size if isinstance(size, int) else int(size[0])

    def derive_image_seq_length(self) -> int:
        """Tokens per image for a known tower family, from its image and patch size."""
        tower_type = self.vision_config.model_type
        if tower_type not in TOWER_HAS_CLS:
            raise BunnyError(
                f"cannot count the image tokens of vision tower type {tower_type!r}; pass image_seq_length"
            )
        grid = self.base_image_size // self.vision_config.patch_size
        keeps_cls = TOWER_HAS_CLS[tower_type] and self.vision_feature_select == "full"
        k = self.image_token_pool
        if k > 1:
            if keeps_cls or grid % k:
                raise BunnyError(f"image_token_pool={k} needs a square grid of patch tokens divisible by {k}; "
                                 f"this tower gives a {grid}x{grid} grid{' plus a CLS token' if keeps_cls else ''}")
            grid //= k
        return grid * grid + int(keeps_cls)

    @property
    def mm_hidden_size(self) -> int:
        scales = len(self.s2_scales) if self.s2_scales else 1
        return self.vision_config.hidden_size * scales


def _check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise BunnyError(f"BunnyConfig.{field}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


# `AutoConfig.from_pretrained` of a bunny checkpoint (model_type "bunny") builds a BunnyConfig;
# modeling.py and processor.py register the model and processor classes for it.
AutoConfig.register("bunny", BunnyConfig)
