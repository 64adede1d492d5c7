"""What a recipe trains: building the model, freezing, LoRA, parameter groups, and the
projector-only file of stage 1.

Each trainable group has its own learning rate (paper: LoRA 2e-4, projector and an
unfrozen tower 2e-5). LoRA goes on every nn.Linear of the LLM except lm_head, through
PEFT, injected in place so the Bunny model keeps its own forward.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bunny.atomic import atomic_files, atomic_folder
from bunny.errors import BunnyError
from bunny.train.recipe import Recipe

PROJECTOR_PREFIX = "model.mm_projector."  # the reference's key prefix in mm_projector.bin
PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")  # what stage 1 writes (ours, the reference's)


def build_for_recipe(recipe: Recipe, dtype: torch.dtype | None = None):
    """(model, processor) as the recipe builds it before training: in float32 for training
    (mixed precision is applied by the engine), or in `dtype` (merging a run's LoRA)."""
    from bunny.model.loading import DEFAULT_TOWER, build_model, load_pretrained

    if recipe.init_from and stage1_projector_file(recipe.init_from):
        model, processor = start_from_stage1(Path(recipe.init_from), recipe, dtype)
    elif recipe.init_from:
        model, processor = load_pretrained(recipe.init_from, template=recipe.template, dtype=dtype)
        model.config.template = recipe.template
    else:
        model, processor = build_model(recipe.llm, tower=recipe.tower or DEFAULT_TOWER, dtype=dtype,
                                       llm_revision=recipe.llm_revision or None,
                                       tower_revision=recipe.tower_revision or None,
                                       projector_type=recipe.projector_type, template=recipe.template,
                                       tokenizer_model_max_length=recipe.model_max_length,
                                       s2_scales=parse_scales(recipe.s2_scales),
                                       image_token_pool=recipe.image_token_pool or 1)
    processor.model_max_length = recipe.model_max_length
    if recipe.tower_image_size and recipe.tower_image_size != model.config.base_image_size:
        from bunny.model.interpolate import set_tower_image_size

        set_tower_image_size(model, recipe.tower_image_size, processor)
    if recipe.projector_weights:
        load_projector(model, recipe.projector_weights)
    return model, processor


def stage1_projector_file(source: str | Path) -> Path | None:
    """The projector file of a stage-1 output folder (projector only: no model weights
    beside it), ours or the reference's; None for anything else (a whole checkpoint, a hub id)."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    weights = [p for p in folder.glob("*.safetensors") if p.name not in PROJECTOR_FILES]
    if weights or list(folder.glob("pytorch_model*.bin")):
        return None
    found = [folder / name for name in PROJECTOR_FILES if (folder / name).is_file()]
    return found[0] if found else None


def start_from_stage1(folder: Path, recipe: Recipe, dtype: torch.dtype | None = None):
    """Stage 2 from a stage-1 output folder: the LLM and tower stage 1 was trained on (they
    were frozen, so their own weights) with the folder's projector.

    Ours: the LLM and tower come from the folder's recipe.yaml, the model's settings from its
    config.json. The reference's (`model_type` bunny-*): its base LLM is the config's
    `_name_or_path`, as the reference's own loader does for a projector-only folder.
    """
    from bunny.model.loading import DEFAULT_TOWER, build_model, load_pretrained

    instead = (f"or start from the LLM and tower with `llm:`, `tower:` and `projector_weights: "
               f"{stage1_projector_file(folder)}`")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise BunnyError(f"init_from {folder} holds a stage-1 projector but no readable config.json ({exc}); "
                         f"{instead}") from None
    if config.get("model_type") != "bunny":  # the reference's stage 1 (bunny-phi, bunny-llama, ...)
        try:
            model, processor = load_pretrained(folder, template=recipe.template, dtype=dtype)
        except BunnyError as exc:
            raise BunnyError(f"init_from {folder}: {exc}; {instead}") from None
        model.config.template = recipe.template
        return model, processor
    stage1 = _stage1_recipe(folder, instead)
    model, processor = build_model(
        stage1.llm, tower=stage1.tower or DEFAULT_TOWER, projector_type=config.get("projector_type", "mlp2x_gelu"),
        dtype=dtype,
        llm_revision=stage1.llm_revision or None, tower_revision=stage1.tower_revision or None,
        template=recipe.template, tokenizer_model_max_length=recipe.model_max_length,
        s2_scales=config.get("s2_scales"), image_token_pool=config.get("image_token_pool", 1),
    )
    if stage1.tower_image_size and stage1.tower_image_size != model.config.base_image_size:
        from bunny.model.interpolate import set_tower_image_size

        set_tower_image_size(model, stage1.tower_image_size, processor)
    load_projector(model, folder / "mm_projector.safetensors")
    return model, processor


def _stage1_recipe(folder: Path, instead: str) -> Recipe:
    """The recipe that wrote a stage-1 folder of ours: it names the LLM and tower."""
    from bunny.train.recipe import load_recipe

    if not (folder / "recipe.yaml").is_file() or not (folder / "mm_projector.safetensors").is_file():
        raise BunnyError(f"init_from {folder} is a bunny stage-1 folder without recipe.yaml and "
                         f"mm_projector.safetensors, so the LLM and tower it was trained on are unknown; {instead}")
    stage1 = load_recipe(folder / "recipe.yaml")
    if stage1.stage != "pretrain" or stage1.unfreeze_tower:
        raise BunnyError(f"init_from {folder}: its recipe.yaml is not a projector-only stage 1 (stage "
                         f"{stage1.stage}, unfreeze_tower {stage1.unfreeze_tower}), so weights other than the "
                         f"projector changed and are not in the folder; start from its model/ checkpoint, {instead}")
    return stage1


def parse_scales(text: str) -> list[int] | None:
    """"384,768,1152" -> [384, 768, 1152]; "" -> None."""
    if not str(text).strip():
        return None
    try:
        return sorted(int(s) for s in str(text).split(","))
    except ValueError:
        raise BunnyError(f"recipe field s2_scales={text!r} must be comma-separated integers, e.g. 384,768,1152") from None


def load_projector(model, path: str | Path) -> None:
    """Projector weights from our safetensors or the reference's mm_projector.bin (tensors
    only: torch.load with weights_only=True, so a pickle cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise BunnyError(f"projector file not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
            raise BunnyError(f"cannot read projector file {path}: {exc}") from None
    state = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if not state:
        raise BunnyError(f"{path} holds no mm_projector.* tensors")
    try:
        model.mm_projector.load_state_dict(state)
    except RuntimeError as exc:
        raise BunnyError(f"{path} does not fit this model's projector: {exc}") from None
    model.config.projector_trained = True


def save_projector(model, folder: str | Path) -> list[Path]:
    """Stage 1's projector-only files: mm_projector.safetensors and the reference's
    mm_projector.bin (a plain dict of tensors, keys `model.mm_projector.0.weight`, ...)."""
    folder = Path(folder)
    state = {PROJECTOR_PREFIX + k: v.detach().float().cpu().contiguous()
             for k, v in model.mm_projector.state_dict().items()}
    out = [folder / "mm_projector.safetensors", folder / "mm_projector.bin"]
    with atomic_files(*out) as (safetensors_tmp, bin_tmp):
        save_file(state, str(safetensors_tmp))
        torch.save(state, bin_tmp)
    return out


_NORM_NEEDS = "projector_norm_init needs image samples and a projector with a linear layer"


@torch.no_grad()
def projector_reference(model, samples: list[dict]) -> torch.Tensor:
    """The projector's inputs for the images of `samples` (samples without one are passed over):
    what `match_projector_norm` and `image_token_norm` measure the image tokens on."""
    pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    if not pixels:
        raise BunnyError(_NORM_NEEDS)
    return model.projector_inputs(torch.cat(pixels).to(model.device))


@torch.no_grad()
def image_token_norm(model, reference: torch.Tensor) -> float:
    """Mean norm of the image tokens the projector makes of `reference` (`projector_reference`)."""
    return float(model.mm_projector(reference).float().norm(dim=-1).mean())


@torch.no_grad()
def match_projector_norm(model, reference: torch.Tensor) -> float:
    """Scale the projector's last linear layer so the mean norm of the image tokens it makes of
    `reference` (`projector_reference`) equals the mean norm of the LLM's token embeddings;
    returns the factor applied."""
    last = [m for m in model.mm_projector.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise BunnyError(_NORM_NEEDS)
    target = model.get_input_embeddings().weight.float().norm(dim=-1).mean()
    scale = float(target / image_token_norm(model, reference))
    last[-1].weight.mul_(scale)
    if last[-1].bias is not None:
        last[-1].bias.mul_(scale)
    return scale


def lora_targets(language_model: nn.Module) -> list[str]:
    """Names (relative to the LLM) of every nn.Linear except the output head."""
    head = language_model.get_output_embeddings()
    return [name for name, m in language_model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and not name.endswith("lm_head")]


def configure_trainables(model, recipe: Recipe) -> list[dict]:
    """Freeze / unfreeze / add LoRA as the recipe says; return optimizer parameter groups."""
    model.requires_grad_(False)
    groups = []
    if recipe.tune == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                            target_modules=lora_targets(model.language_model), bias="none")
        inject_adapter_in_model(config, model.language_model)
        model.language_model.requires_grad_(False)
        lora = [p for n, p in model.language_model.named_parameters() if "lora_" in n]
        for p in lora:
            p.requires_grad_(True)
        model._bunny_lora_config = config  # kept for writing adapter files at the end
        groups.append({"name": "lora", "params": lora, "lr": recipe.lr})
    elif recipe.tune == "full":
        model.language_model.requires_grad_(True)
        groups.append({"name": "llm", "params": list(model.language_model.parameters()), "lr": recipe.lr})
    model.mm_projector.requires_grad_(True)
    groups.append({"name": "projector", "params": list(model.mm_projector.parameters()),
                   "lr": recipe.lr if recipe.stage == "pretrain" else recipe.effective_projector_lr})
    if recipe.unfreeze_tower:
        model.vision_tower.requires_grad_(True)
        groups.append({"name": "tower", "params": list(model.vision_tower.parameters()),
                       "lr": recipe.effective_tower_lr})
    for g in groups:
        g["weight_decay"] = recipe.weight_decay
        g["initial_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def merge_lora(model) -> None:
    """Fold the trained LoRA into the LLM's weights (W += alpha/r * B @ A, bunny's one fold:
    bunny.merge.lora.fold_lora) and remove the adapter layers, leaving a plain model that
    loads without PEFT."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    from bunny.merge.lora import fold_lora

    llm = model.language_model
    lora = get_peft_model_state_dict(llm)  # keys as in the adapter files, named after the LLM's modules
    for name, module in list(llm.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = llm.get_submodule(parent_name) if parent_name else llm
            setattr(parent, child, module.get_base_layer())
    fold_lora(llm, model._bunny_lora_config.to_dict(), lora, source="the trained LoRA")


def save_adapter(model, folder: str | Path) -> None:
    """PEFT adapter files (adapter_config.json + adapter_model.safetensors, PEFT's key
    layout) and the non-LoRA trainables (projector, tower if unfrozen), as one folder that
    replaces `folder` whole (`atomic_folder`)."""
    from peft import get_peft_model_state_dict

    config = model._bunny_lora_config
    state = get_peft_model_state_dict(model.language_model)
    extra = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
             if p.requires_grad and not n.startswith("language_model.")}
    with atomic_folder(folder) as tmp:
        save_file({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()},
                  str(tmp / "adapter_model.safetensors"))
        config.save_pretrained(str(tmp))
        save_file(extra, str(tmp / "non_lora_trainables.safetensors"))
