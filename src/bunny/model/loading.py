"""Building a Bunny from parts, and loading any checkpoint as `(model, processor)`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bunny.atomic import atomic_folder
from bunny.errors import BunnyError
from bunny.model.config import BunnyConfig
from bunny.model.embedded import EMBEDDED_LLMS, is_embedded, resolve_llm
from bunny.model.hub import local_or_hub
from bunny.model.modeling import BunnyForConditionalGeneration
from bunny.model.processor import BunnyProcessor
from bunny.model.towers import load_image_processor, load_vision_model, resolve_tower_source

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The small tower shipped in the repository (trained on the synthetic shapes generator).
DEFAULT_TOWER = str(ASSETS / "towers" / "shapes-siglip-64")


def build_model(
    llm: str,
    tower: str = DEFAULT_TOWER,
    projector_type: str = "mlp2x_gelu",
    template: str = "bunny",
    dtype: torch.dtype | None = None,
    llm_revision: str | None = None,
    tower_revision: str | None = None,
    **config_kwargs,
) -> tuple[BunnyForConditionalGeneration, BunnyProcessor]:
    """Compose a pretrained tower and a pretrained causal LM with a new projector.

    `llm` and `tower` are local folders, hub ids (fetched into the hub cache, at
    `llm_revision` / `tower_revision` when given) or registered names (`smollm2-135m`,
    tower presets). As the reference does, the LLM's embeddings are cut to the tokenizer's
    length, so the padded vocabulary rows some LLMs carry (Qwen1.5, Phi-2) can never be generated.
    """
    llm_path = resolve_llm(llm, llm_revision)
    tower_path = resolve_tower_source(tower, tower_revision)
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    language_model = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype)
    fit_vocabulary(language_model, tokenizer, llm)
    vision = load_vision_model(tower_path, dtype=dtype)
    model = BunnyForConditionalGeneration.from_parts(
        vision,
        language_model,
        projector_type=projector_type,
        template=template,
        vision_tower=tower,
        projector_trained=False,
        **config_kwargs,
    )
    processor = BunnyProcessor.from_config(model.config, tokenizer, load_image_processor(tower_path))
    return model, processor


def fit_vocabulary(language_model, tokenizer, name: str) -> None:
    vocab, n_tokens = language_model.config.vocab_size, len(tokenizer)
    if n_tokens > vocab:
        raise BunnyError(f"{name}: the tokenizer has {n_tokens} tokens but the LLM only {vocab} embeddings")
    if n_tokens < vocab:
        language_model.resize_token_embeddings(n_tokens)


def load_pretrained(
    path_or_name: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model_base: str | None = None,
    template: str | None = None,
    revision: str | None = None,
    vision_tower: str | None = None,
) -> tuple[BunnyForConditionalGeneration, BunnyProcessor]:
    """`(model, processor)` for a bunny checkpoint, any reference layout, or a plain LLM,
    given by local folder, hub id (fetched into the hub cache, at `revision` when given)
    or embedded name.

    A plain LLM (e.g. the embedded `smollm2-135m`) is composed with the shipped tower and a
    new projector (`config.projector_trained` is False: fine for text, not for images).
    `model_base` is the base LLM of a reference stage-1 or LoRA folder (folder or hub id).
    `vision_tower` replaces a reference checkpoint's `mm_vision_tower` (folder, preset or hub
    id) where that names a folder that does not exist here (Bunny-v1_1-4B names one on its
    authors' machine). `template` overrides the checkpoint's own template.
    """
    folder = fetch_model(path_or_name, revision)
    kind = checkpoint_kind(folder)
    if vision_tower and kind != "reference":
        raise BunnyError(f"vision_tower ({vision_tower!r}) replaces a reference checkpoint's mm_vision_tower; "
                         f"{path_or_name} is a {kind} checkpoint, whose tower is its own")
    if kind == "bunny":
        model, processor = _load_bunny(Path(folder), dtype)
    elif kind == "llm":
        model, processor = build_model(folder, dtype=dtype)
    else:
        from bunny.convert.reference import load_reference

        model, processor = load_reference(Path(folder), model_base=model_base, dtype=dtype, vision_tower=vision_tower)
    if template is not None:
        processor.template = template
    model.to(device)
    model.eval()
    return model, processor


def fetch_model(path_or_name: str | os.PathLike, revision: str | None = None) -> str:
    """The local folder of a model named by path or hub id (a hub id is fetched into the hub
    cache, or found there offline); an embedded LLM name is returned unchanged."""
    name = str(path_or_name)
    if is_embedded(name, revision):
        return name
    return str(local_or_hub(name, revision, what="model"))


def checkpoint_kind(source: str | os.PathLike) -> str:
    """'bunny' (ours), 'reference' (BAAI Bunny layouts) or 'llm' (a plain causal LM), for an
    embedded name or a local folder."""
    if str(source) in EMBEDDED_LLMS:
        return "llm"
    folder = Path(source)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise BunnyError(f"{folder} holds no config.json; not a model checkpoint")
    config = json.loads(config_file.read_text())
    if config.get("model_type") == "bunny":
        return "bunny"
    if "mm_vision_tower" in config or str(config.get("model_type", "")).startswith("bunny-"):
        return "reference"
    return "llm"


def _load_bunny(folder: Path, dtype) -> tuple[BunnyForConditionalGeneration, BunnyProcessor]:
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        if (folder / "mm_projector.safetensors").is_file():
            raise BunnyError(
                f"{folder} is a stage-1 output: it holds only the projector (mm_projector.safetensors), not a "
                f"whole model; train stage 2 from it (recipe `init_from: {folder}`), or compose a model with "
                "build_model(llm, tower) and the recipe field `projector_weights`"
            )
        raise BunnyError(f"{folder} holds a bunny config.json but no model weights (model.safetensors)")
    model, info = BunnyForConditionalGeneration.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        details = "; ".join(f"{k}: {', '.join(map(str, v[:10]))}{' ...' if len(v) > 10 else ''}" for k, v in problems.items())
        raise BunnyError(f"checkpoint {folder} does not match its config ({details})")
    return model, BunnyProcessor.from_pretrained(folder)


def save_pretrained(model: BunnyForConditionalGeneration, processor: BunnyProcessor, folder: str | os.PathLike,
                    protect_others: bool = True) -> Path:
    """Write model + processor atomically: into a temporary sibling folder, then renamed. An
    existing `folder` is replaced only when this writes every file it holds (a resave of the same
    kind of model), unless `protect_others` is False (a folder the caller owns, as a training
    run's `model/`)."""
    with atomic_folder(folder, protect_others=protect_others) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(folder)


__all__ = ["BunnyConfig", "build_model", "fetch_model", "load_pretrained", "save_pretrained", "DEFAULT_TOWER"]
