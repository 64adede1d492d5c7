"""Bunny -> transformers' `LlavaForConditionalGeneration` with the same weights.

vLLM and SGLang serve the llava-hf layout. Llava looks the image token up in the LLM's
embedding table, so the vocabulary grows by one row for it: its embedding and lm_head rows
are zero (its logit is 0), the exported generation config suppresses it, and callers
compare the first `vocab_size` logit columns. Only single-scale towers with an
`mlp2x_gelu` projector have a Llava equivalent.
"""
from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from bunny.errors import BunnyError

_SELECT = {"full": "full", "patch": "default"}


def check_exportable(config) -> None:
    reasons = []
    if config.s2_scales:
        reasons.append("S2 multi-scale features (Llava has one scale)")
    if config.projector_type != "mlp2x_gelu":
        reasons.append(f"projector {config.projector_type!r} (Llava has mlp2x_gelu only)")
    if config.vision_config.model_type == "bunny_timm_vision":
        reasons.append("a timm tower (Llava needs a transformers vision model)")
    if getattr(config, "image_token_pool", 1) > 1:
        reasons.append(f"image_token_pool {config.image_token_pool} (Llava projects every patch token)")
    if reasons:
        raise BunnyError("cannot export to llava-hf: " + "; ".join(reasons))


def llava_config(config) -> LlavaConfig:
    check_exportable(config)
    text = config.text_config.to_dict() | {"model_type": config.text_config.model_type}
    text["vocab_size"] = config.text_config.vocab_size + 1
    return LlavaConfig(
        vision_config=config.vision_config.to_dict() | {"model_type": config.vision_config.model_type},
        text_config=text,
        image_token_index=config.text_config.vocab_size,
        image_seq_length=config.image_seq_length,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=_SELECT[config.vision_feature_select],
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


@torch.no_grad()
def to_llava_hf(model) -> LlavaForConditionalGeneration:
    """A Llava model holding the same weights (copies; float32 unless the model is not)."""
    cfg = model.config
    llava = LlavaForConditionalGeneration(llava_config(cfg)).to(model.dtype).eval()
    llava.model.vision_tower.load_state_dict(model.vision_tower.state_dict())
    proj = model.mm_projector
    llava.model.multi_modal_projector.linear_1.load_state_dict(proj[0].state_dict())
    llava.model.multi_modal_projector.linear_2.load_state_dict(proj[2].state_dict())
    decoder_state = model.language_model.get_decoder().state_dict()
    embed_key = next(k for k in decoder_state if k.endswith("embed_tokens.weight"))
    vocab = cfg.text_config.vocab_size
    embed = decoder_state[embed_key]
    decoder_state[embed_key] = torch.cat([embed, embed.new_zeros((1, embed.shape[1]))])
    llava.model.language_model.load_state_dict(decoder_state)
    head = model.language_model.get_output_embeddings()
    llava.lm_head.weight.zero_()
    llava.lm_head.weight[:vocab] = head.weight
    if head.bias is not None:
        raise BunnyError("cannot export to llava-hf: the LLM's output head has a bias, Llava's has none")
    return llava
