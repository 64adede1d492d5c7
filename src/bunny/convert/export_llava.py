"""`bunny export llava-hf MODEL OUT`: a folder that transformers' `LlavaForConditionalGeneration`
and `LlavaProcessor` load (and so `pipeline("image-text-to-text")`, vLLM, SGLang, TGI), with
bunny's logits and bunny's greedy answers.

What makes the folder answer as bunny does, besides the weights (`bunny.convert.llava_hf`):
- tokenizer: a special `<image>` token at the id the model reserves for images (the LLM's
  vocabulary size), which `LlavaProcessor` expands to `image_seq_length` ids.
- image processor: `LlavaImageProcessor` with the tower's resize, rescale and normalisation,
  and `do_pad` for bunny's `pad` mode (centred on a square of the mean colour `int(m * 255)`,
  as the reference's expand2square). Checked at export time on a non-square image against
  bunny's own preprocessing.
- chat template: a Jinja template rendering exactly bunny's prompt text for the model's
  template (content parts joined by newlines, `<image>` per image part).
- generation config: greedy, stopping on every token bunny stops on (EOS and the template's
  separator), with the image token suppressed (its head row is zero, so its logit is 0).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from bunny.atomic import atomic_folder, check_output_folder
from bunny.convert.jinja_chat import chat_template
from bunny.errors import BunnyError

IMAGE_TOKEN = "<image>"
# Image processor settings carried from the tower's processor to LlavaImageProcessor.
_IMAGE_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
               "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def llava_image_processor(image_processor, image_mode: str):
    """transformers' LlavaImageProcessor (PIL backend) doing what bunny's preprocessing does."""
    from transformers import LlavaImageProcessorPil

    if image_mode not in ("pad", "square"):
        raise BunnyError(f"cannot export to llava-hf: image mode {image_mode!r} (valid: pad, square)")
    settings = image_processor.to_dict()
    kwargs = {k: settings[k] for k in _IMAGE_KEYS if settings.get(k) is not None}
    kwargs.setdefault("do_center_crop", False)  # SigLIP processors resize to the exact size, no crop
    return LlavaImageProcessorPil(**kwargs, do_pad=image_mode == "pad")


def check_same_pixels(llava_image_processor, image_processor, image_mode: str) -> None:
    """Bunny's pixels and LlavaImageProcessor's for a non-square image: equal, or the export fails."""
    from PIL import Image

    from bunny.model.images import preprocess_images

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (45, 70, 3), generator=g, dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    ours = preprocess_images([image], image_processor, image_mode)
    theirs = llava_image_processor(images=[image], return_tensors="pt")["pixel_values"]
    if ours.shape != theirs.shape or not torch.equal(ours, theirs.to(ours.dtype)):
        raise BunnyError(f"cannot export to llava-hf: LlavaImageProcessor does not reproduce the tower's "
                         f"{type(image_processor).__name__} in mode {image_mode!r}")


def llava_chat_template(template_name: str, tokenizer) -> str:
    """bunny.convert.jinja_chat's template; a `native` template needs the tokenizer's own."""
    jinja = chat_template(template_name, tokenizer)
    if jinja is None:
        raise BunnyError("cannot export to llava-hf: the model's template is 'native' but its tokenizer "
                         "has no (single) chat template")
    return jinja


def llava_processor(model, processor):
    from transformers import LlavaProcessor

    cfg = model.config
    tokenizer = copy.deepcopy(processor.tokenizer)
    vocab = cfg.text_config.vocab_size
    if len(tokenizer) != vocab:
        raise BunnyError(f"cannot export to llava-hf: the tokenizer has {len(tokenizer)} tokens but the LLM "
                         f"{vocab} embeddings; the image token must take id {vocab}")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    got = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if got != cfg.image_token_index:
        raise BunnyError(f"cannot export to llava-hf: {IMAGE_TOKEN} got id {got}, "
                         f"the model expects {cfg.image_token_index}")
    image_processor = llava_image_processor(processor.image_processor, processor.image_mode)
    check_same_pixels(image_processor, processor.image_processor, processor.image_mode)
    has_cls = cfg.vision_config.model_type == "clip_vision_model"
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy="default" if cfg.vision_feature_select == "patch" else "full",
        image_token=IMAGE_TOKEN, num_additional_image_tokens=int(has_cls),
        chat_template=llava_chat_template(processor.template, processor.tokenizer),
    )


def generation_config(model, processor):
    """Greedy decoding that stops where bunny's `generate` stops."""
    from transformers import GenerationConfig

    tokenizer = processor.tokenizer
    for stop in processor.stop_strings:
        if len(tokenizer(stop, add_special_tokens=False).input_ids) != 1:
            raise BunnyError(f"cannot export to llava-hf: the template's stop string {stop!r} is not one token of "
                             f"this tokenizer, and the engines stop on token ids")
    stops = processor.stop_token_ids()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    return GenerationConfig(do_sample=False, eos_token_id=stops, pad_token_id=pad,
                            bos_token_id=tokenizer.bos_token_id, suppress_tokens=[model.config.image_token_index])


def export_llava_hf(model_path: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    from bunny.convert.llava_hf import check_exportable, to_llava_hf
    from bunny.model.loading import load_pretrained

    check_output_folder(out)
    if Path(out).resolve() == Path(model_path).resolve():
        raise BunnyError(f"{out} is the model being exported; write the LLaVA-HF export to another folder")
    model, processor = load_pretrained(model_path, dtype=dtype)
    check_exportable(model.config)  # S2, other projectors, timm towers: say why before converting
    llava = to_llava_hf(model)
    llava.generation_config = generation_config(model, processor)
    llava_proc = llava_processor(model, processor)
    with atomic_folder(out, protect_others=True) as tmp:
        llava.save_pretrained(tmp)
        llava_proc.save_pretrained(tmp)
    return Path(out)
