"""Load any reference (BAAI Bunny) checkpoint as our `(model, processor)`, and convert it.

Layouts (see docs/reference-checkpoints.md for the key map of each):
- stage 1: `config.json` + `mm_projector.bin`, on a base LLM (`model_base` or `_name_or_path`);
- LoRA: PEFT adapter + `config.json` + `non_lora_trainables.bin`, on `model_base`;
- merged / full, and the published hub layout: HF shards holding the LLM's own keys,
  `model.mm_projector.*` and `model.vision_tower.vision_tower.*`.

The reference's loading rules are kept: the LLM's architecture comes from the checkpoint's
config; the tokenizer from the base LLM (stage 1, LoRA) or the checkpoint (merged); the
embeddings are cut to `len(tokenizer)`; the tower's weights come from the checkpoint only
when `unfreeze_vision_tower` is set, otherwise from `mm_vision_tower`. Unlike the
reference, every load is strict and remote code is never run.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.initialization import no_init_weights

from bunny.convert.reference_config import LORA, MERGED, STAGE1, ReferenceCheckpoint, read_reference
from bunny.convert.weights import load_strict, load_tensor_file, read_shards, tied_head_keys
from bunny.atomic import check_output_folder
from bunny.errors import BunnyError
from bunny.model.loading import fit_vocabulary, save_pretrained
from bunny.model.towers import load_image_processor
from bunny.model.modeling import BunnyForConditionalGeneration
from bunny.model.processor import BunnyProcessor
from bunny.model.projectors import build_projector
from bunny.model.towers import build_vision_model, load_vision_config, load_vision_model

# Prefixes of the reference's module tree (BunnyXForCausalLM.model is the LLM body plus
# the tower and projector); a PEFT wrapper adds `base_model.model.` in front.
PEFT_PREFIX = "base_model.model."
PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower.vision_tower."
# The reference's tower is transformers 4's SiglipVisionModel / CLIPVisionModel, whose layers
# sat under `vision_model.` (`vision_model.embeddings.*`, `vision_model.head.*`, ...).
# transformers 5 keeps them at the top of the module and drops that root in its own
# `from_pretrained`; the checkpoint's tower keys are mapped the same way.
TOWER_ROOT = "vision_model."


def load_reference(
    folder: str | os.PathLike, model_base: str | None = None, dtype: torch.dtype | None = None,
    vision_tower: str | None = None,
) -> tuple[BunnyForConditionalGeneration, BunnyProcessor]:
    """`(model, processor)` for a reference checkpoint folder of any layout.

    dtype: float32 by default (the exact reference for a float32 implementation; the
    reference itself loads in float16).
    vision_tower: the tower to use in place of the config's `mm_vision_tower` (a folder,
    preset or hub id), for a config naming one that cannot be found (Bunny-v1_1-4B names a
    folder on its authors' machine). An unfrozen tower's weights still come from the checkpoint.
    """
    ckpt = read_reference(Path(folder))
    if vision_tower:
        ckpt.config["mm_vision_tower"] = vision_tower
    dtype = dtype or torch.float32
    text_config = ckpt.text_config()  # fails early, and clearly, for MiniCPM
    tower = _tower_folder(ckpt)  # resolved (fetched) once, before gigabytes of LLM weights are read
    if ckpt.layout == MERGED:
        state = read_shards(ckpt.folder)
        tokenizer_source = str(ckpt.folder)
        source = f"the shards of {ckpt.folder}"
    else:
        base = ckpt.base_source(model_base)
        state = read_shards(Path(base))
        tokenizer_source = base
        source = f"the base LLM {base}"
    extra = _extra_weights(ckpt)
    llm_state, projector_state, tower_state = split_reference_state(state | extra)
    if ckpt.layout != MERGED:
        # A base LLM's shards hold only the LLM; the projector (and tower) come from the extra file.
        source = f"{source} + {_extra_file(ckpt)}"

    # Every weight is overwritten by the strict load below: skip random init (minutes for an 8B LLM).
    with no_init_weights():
        language_model = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
    load_strict(language_model, llm_state, f"LLM weights of {source}", optional=tied_head_keys(language_model))
    # no_init_weights also skips tying: tie now, or a tied head would keep uninitialised memory.
    language_model.tie_weights()
    if ckpt.layout == LORA:
        from bunny.convert.lora import merge_lora

        language_model = merge_lora(language_model, ckpt.folder)
    tokenizer = _load_tokenizer(tokenizer_source)
    fit_vocabulary(language_model, tokenizer, str(ckpt.folder))

    vision = _load_tower(ckpt, tower, tower_state, source, dtype)
    projector = _load_projector(ckpt, projector_state, vision, language_model, source, dtype)
    settings = ckpt.bunny_settings()
    model = BunnyForConditionalGeneration.from_parts(
        vision, language_model, projector_type=ckpt.config.get("mm_projector_type") or "mlp2x_gelu",
        projector=projector, **settings,
    )
    model.eval()
    image_processor = load_image_processor(tower)
    if model.config.s2_scales:  # the reference feeds S2 towers images at the largest scale
        image_processor.size = {"height": max(model.config.s2_scales), "width": max(model.config.s2_scales)}
    return model, BunnyProcessor.from_config(model.config, tokenizer, image_processor)


def convert_reference(
    src: str | os.PathLike, out: str | os.PathLike, model_base: str | None = None, dtype: torch.dtype | None = None,
    vision_tower: str | None = None,
) -> Path:
    """Write a reference checkpoint as a bunny checkpoint (loadable by `load_pretrained`)."""
    check_output_folder(out)
    model, processor = load_reference(src, model_base=model_base, dtype=dtype, vision_tower=vision_tower)
    return save_pretrained(model, processor, out)


def split_reference_state(state: dict[str, torch.Tensor]):
    """Reference keys -> (LLM keys, projector keys, tower keys), each in our module's names."""
    llm, projector, tower = {}, {}, {}
    for key, value in state.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if name.startswith(PROJECTOR_PREFIX):
            projector[name[len(PROJECTOR_PREFIX):]] = value
        elif name.startswith(TOWER_PREFIX):
            tower[name[len(TOWER_PREFIX):]] = value
        elif name.startswith("model.vision_tower."):
            raise BunnyError(f"unexpected vision tower key {key}: expected the prefix {TOWER_PREFIX}")
        else:
            llm[name] = value
    return llm, projector, tower


def _extra_file(ckpt: ReferenceCheckpoint) -> Path:
    return ckpt.folder / ("non_lora_trainables.bin" if ckpt.layout == LORA else "mm_projector.bin")


def _extra_weights(ckpt: ReferenceCheckpoint) -> dict[str, torch.Tensor]:
    """Stage 1's projector file, or LoRA's non-LoRA trainables (projector, tower if unfrozen)."""
    if ckpt.layout == MERGED:
        return {}
    path = _extra_file(ckpt)
    state = load_tensor_file(path)
    if ckpt.layout == STAGE1:
        outside = sorted(k for k in state if not k.startswith(PROJECTOR_PREFIX))
        if outside:
            raise BunnyError(f"{path} should hold only {PROJECTOR_PREFIX}* keys; unexpected keys: {', '.join(outside[:12])}")
    return state


def _load_tokenizer(source: str):
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise BunnyError(f"cannot load the tokenizer from {source}: {exc}") from None


def _tower_folder(ckpt: ReferenceCheckpoint) -> str:
    try:
        return ckpt.tower_source()
    except BunnyError as exc:
        raise BunnyError(f"{exc}; to name a tower in its place, convert with `bunny convert reference SRC OUT "
                         "--vision-tower TOWER` (or pass vision_tower= to load_reference)") from None


def _load_tower(ckpt: ReferenceCheckpoint, tower: str, tower_state: dict, source: str, dtype):
    try:
        if not ckpt.unfreeze_vision_tower:
            # A frozen tower is the pretrained one; copies of it in the checkpoint are ignored, as the reference does.
            return load_vision_model(tower, dtype=dtype).eval()
        vision = build_vision_model(load_vision_config(tower)).to(dtype)
    except BunnyError:
        raise
    except (OSError, ValueError) as exc:  # not a folder, not downloaded, or not a tower
        raise BunnyError(f"cannot load the vision tower {tower!r} (mm_vision_tower of {ckpt.folder}): {exc}") from None
    if not tower_state:
        raise BunnyError(f"{ckpt.folder} sets unfreeze_vision_tower but {source} hold no {TOWER_PREFIX}* keys")
    load_strict(vision, tower_module_names(vision, tower_state), f"vision tower weights ({TOWER_PREFIX}*) of {source}")
    return vision.eval()


def tower_module_names(vision, tower_state: dict) -> dict:
    """The checkpoint's tower keys in the module's names: `vision_model.<name>` -> `<name>`
    when the module has no `vision_model.` root. Keys outside that root are kept as they are,
    so the strict load reports them."""
    if any(key.startswith(TOWER_ROOT) for key in vision.state_dict()):
        return tower_state
    renamed = {key.removeprefix(TOWER_ROOT): value for key, value in tower_state.items()}
    if len(renamed) != len(tower_state):
        twice = sorted(k for k in tower_state if k.startswith(TOWER_ROOT) and k.removeprefix(TOWER_ROOT) in tower_state)
        raise BunnyError(f"vision tower keys stored twice, with and without {TOWER_ROOT!r}: {', '.join(twice[:12])}")
    return renamed


def _load_projector(ckpt, projector_state: dict, vision, language_model, source: str, dtype):
    name = ckpt.config.get("mm_projector_type") or "mlp2x_gelu"
    scales = len(ckpt.s2_scales() or [None])
    mm_hidden = vision.config.hidden_size * scales
    recorded = ckpt.config.get("mm_hidden_size")
    if recorded is not None and recorded != mm_hidden:
        raise BunnyError(
            f"{ckpt.folder / 'config.json'}: mm_hidden_size {recorded} does not match the tower "
            f"{ckpt.config.get('mm_vision_tower')!r} ({mm_hidden} features)"
        )
    projector = build_projector(name, mm_hidden, language_model.config.hidden_size).to(dtype)
    load_strict(projector, projector_state, f"projector weights ({PROJECTOR_PREFIX}*) of {source}")
    return projector
