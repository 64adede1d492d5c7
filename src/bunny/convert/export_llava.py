"""`bunny export llava-hf MODEL OUT`: a folder that transformers' `LlavaForConditionalGeneration`
and `LlavaProcessor` load (and so vLLM, SGLang, TGI serve), with bunny's logits.

Weights come from `to_llava_hf` (bunny.convert.llava_hf). Llava looks its image token up in
the vocabulary, so the tokenizer gains a special `<image>` token whose id is the one the
model reserves for images (the LLM's vocabulary size). The image processor is bunny's; the
`pad` image mode (padding to a square with the mean colour) is bunny's own step and is not
part of LlavaProcessor: pad non-square images before calling it to get identical inputs.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from bunny.atomic import atomic_folder
from bunny.errors import BunnyError

IMAGE_TOKEN = "<image>"


def llava_processor(model, processor):
    from transformers import LlavaProcessor

    cfg = model.config
    tokenizer = copy.deepcopy(processor.tokenizer)
    vocab = cfg.text_config.vocab_size
    if len(tokenizer) != vocab:
        raise BunnyError(f"cannot export to llava-hf: the tokenizer has {len(tokenizer)} tokens but the LLM "
                         f"{vocab} embeddings; the image token must take id {vocab}")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != cfg.image_token_index:
        raise BunnyError(f"cannot export to llava-hf: {IMAGE_TOKEN} got id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, "
                         f"the model expects {cfg.image_token_index}")
    has_cls = cfg.vision_config.model_type == "clip_vision_model"
    return LlavaProcessor(
        image_processor=copy.deepcopy(processor.image_processor), tokenizer=tokenizer,
        patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy="default" if cfg.vision_feature_select == "patch" else "full",
        image_token=IMAGE_TOKEN, num_additional_image_tokens=int(has_cls),
    )


def export_llava_hf(model_path: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    from bunny.convert.llava_hf import check_exportable, to_llava_hf
    from bunny.model.loading import load_pretrained

    model, processor = load_pretrained(model_path, dtype=dtype)
    check_exportable(model.config)  # S2, other projectors, timm towers: say why before converting
    llava = to_llava_hf(model)
    llava_proc = llava_processor(model, processor)
    with atomic_folder(out) as tmp:
        llava.save_pretrained(tmp)
        llava_proc.save_pretrained(tmp)
    return Path(out)
