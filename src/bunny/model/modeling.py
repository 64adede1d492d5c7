"""`BunnyForConditionalGeneration`: vision tower -> projector -> any causal LM.

No per-backbone code: the LLM is whatever `AutoModelForCausalLM` builds from
`config.text_config`, and the tower whatever `AutoModel` builds from `config.vision_config`
(or a timm tower). Image features replace the placeholder tokens that the processor
expanded, one run of `config.image_seq_length` tokens per image, with `masked_scatter`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationMixin,
                          PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutputWithPast

from bunny.errors import BunnyError
from bunny.model.config import BunnyConfig
from bunny.model.projectors import build_projector
from bunny.model.towers import build_vision_model, tower_features

IGNORE_INDEX = -100


class BunnyPreTrainedModel(PreTrainedModel):
    config_class = BunnyConfig
    base_model_prefix = "bunny"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules: list[str] = []
    input_modalities = ("image", "text")


class BunnyForConditionalGeneration(BunnyPreTrainedModel, GenerationMixin):
    def __init__(self, config: BunnyConfig):
        super().__init__(config)
        self.vision_tower = build_vision_model(config.vision_config)
        self.mm_projector = build_projector(
            config.projector_type, config.mm_hidden_size, config.text_config.hidden_size
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    # -- plumbing expected by transformers (generation, resizing, PEFT) ---------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_decoder(self):
        return self.language_model.get_decoder()

    # -- images ----------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, image_seq_length, H_llm) projected features."""
        return self.mm_projector(self.projector_inputs(pixel_values))

    def projector_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> what the projector reads: the tower's features (S2, pooled) in its dtype."""
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        if self.config.s2_scales:
            from bunny.model.s2 import s2_features

            features = s2_features(self._tower_features, pixel_values, self.config.s2_scales)
        else:
            features = self._tower_features(pixel_values)
        if self.config.image_token_pool > 1:
            features = pool_tokens(features, self.config.image_token_pool)
        return features.to(self.mm_projector_dtype)

    def _tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return tower_features(
            self.vision_tower, pixel_values, self.config.vision_feature_layer, self.config.vision_feature_select
        )

    @property
    def mm_projector_dtype(self) -> torch.dtype:
        params = list(self.mm_projector.parameters())
        return params[0].dtype if params else self.dtype

    def embed_inputs(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features written over the placeholder tokens. (B, T, H)"""
        image_mask = input_ids == self.config.image_token_index
        # The placeholder id lies outside the LLM's vocabulary; look up a harmless id instead.
        embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        n_tokens = int(image_mask.sum())
        per_image = self.config.image_seq_length
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_tokens:
                raise BunnyError(f"the input holds {n_tokens // per_image} image placeholders but no images were given")
            return embeds
        n_images = pixel_values.shape[0]
        if n_tokens != n_images * per_image:
            raise BunnyError(
                f"the input holds {n_tokens} image tokens ({n_tokens / per_image:g} images of {per_image} tokens) "
                f"but {n_images} images were given; each <image> must match exactly one image"
            )
        features = self.get_image_features(pixel_values)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T) with expanded image placeholders; pixel_values (N_images, 3, H, W).

        Position ids restart at 0 in every sample (left padding included), so a batch gives
        the same results as each sample alone. Packed batches (`bunny.data.packing`) bring
        their own position ids and either a 4-D boolean mask (rows, 1, T, T) or, for
        flash-attention's variable-length path, no mask. With `labels`, logits are computed only at
        the positions some sample in the batch trains on (the vocabulary head is the most
        expensive layer of a small LLM), and the loss is the mean over trained tokens.
        """
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        if inputs_embeds is None:
            if input_ids is None:
                raise BunnyError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            position_ids = positions_from_mask(attention_mask)[:, -inputs_embeds.shape[1] :]
        if attention_mask is not None and attention_mask.ndim == 4 and attention_mask.dtype == torch.bool \
                and self.language_model.config._attn_implementation == "eager":
            # A custom 4-D mask (independent turns) goes to the attention as it is; eager
            # attention adds it to the scores, so it must be additive there.
            attention_mask = torch.zeros(attention_mask.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device
                                         ).masked_fill(~attention_mask, torch.finfo(inputs_embeds.dtype).min)

        targets = None
        if labels is not None:
            # A forward with labels (training, scoring) needs no cache; a cache would also stop
            # transformers from reading packed samples' boundaries from the position ids.
            use_cache = False if use_cache is None else use_cache
            if input_ids is not None:  # image placeholders are never targets
                labels = labels.masked_fill(input_ids == self.config.image_token_index, IGNORE_INDEX)
            targets = labels[:, 1:]
            trained = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
            if trained.numel() == 0:
                raise BunnyError("no token in this batch is trained on (every label is -100)")
            logits_to_keep = trained
            targets = targets[:, trained]

        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=out.logits, cache=out.cache, hidden_states=out.hidden_states, attentions=out.attentions
        )

    # -- composing from parts -----------------------------------------------------------------
    @classmethod
    def from_parts(
        cls,
        vision_model: nn.Module,
        language_model: PreTrainedModel,
        projector_type: str = "mlp2x_gelu",
        projector: nn.Module | None = None,
        **config_kwargs,
    ) -> "BunnyForConditionalGeneration":
        """Compose pretrained parts without re-initialising them (the projector is new unless given)."""
        config = BunnyConfig(
            vision_config=vision_model.config.to_dict() | {"model_type": vision_model.config.model_type},
            text_config=language_model.config.to_dict() | {"model_type": language_model.config.model_type},
            projector_type=projector_type,
            **config_kwargs,
        )
        with torch.device("meta"):
            model = cls(config)
        model.vision_tower = vision_model
        model.language_model = language_model
        model.mm_projector = projector if projector is not None else build_projector(
            projector_type, config.mm_hidden_size, config.text_config.hidden_size
        )
        if projector is None:
            model.mm_projector.to(dtype=language_model.dtype)
        return model


def pool_tokens(features: torch.Tensor, k: int) -> torch.Tensor:
    """(N, g*g, D) patch tokens in row-major grid order -> (N, (g/k)^2, D), each the mean of
    a k x k block of neighbours (still row-major)."""
    n, length, dim = features.shape
    g = math.isqrt(length)
    if g * g != length or g % k:
        raise BunnyError(f"cannot pool {length} image tokens in {k}x{k} blocks: not a square grid divisible by {k}")
    grid = features.reshape(n, g, g, dim).permute(0, 3, 1, 2)
    return F.avg_pool2d(grid, k).flatten(2).transpose(1, 2)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Positions counted over real tokens only: 0 at each sample's first token. (B, T)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# transformers' Auto classes open a bunny checkpoint once this module is imported (config.py
# registers the config; processor.py, imported here, the processor). Never through remote code.
import bunny.model.processor  # noqa: E402,F401  (registers BunnyProcessor with AutoProcessor)

for _auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto.register(BunnyConfig, BunnyForConditionalGeneration)
