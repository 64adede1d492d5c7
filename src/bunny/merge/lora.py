"""Folding a stage-2 LoRA adapter into its base model: W <- W + s * B @ A, s = alpha / r.

Layouts accepted as ADAPTER (see docs/merge-export.md):
- bunny's stage-2 output (`bunny train finetune`, tune lora): `OUTPUT/adapter/` holding PEFT's
  `adapter_config.json` + `adapter_model.safetensors` (keys `base_model.model.<LLM key>`) and
  `non_lora_trainables.safetensors` (projector, tower if unfrozen; keys of the bunny model).
  The training output folder itself may be given: its `adapter/` is used, and its
  `recipe.yaml` names the base (`init_from`, or `llm` + `tower`) unless `--base` is given.
- a reference (BAAI Bunny) LoRA folder (`config.json` with `mm_vision_tower`,
  `non_lora_trainables.bin`): converted by bunny.convert.reference, which merges it.
- a QLoRA run's output (`quantize_base: 4bit|8bit`): the same files; the base is rebuilt in
  full precision and the adapter folded into it (`merged_model`).

`fold_lora` is bunny's one LoRA fold: `bunny merge lora`, the reference's LoRA folders
(bunny.convert.lora) and the end of stage-2 training (bunny.train.parts.merge_lora) all use
it. It is done here rather than through PEFT so that every adapter key is checked against
the base (PEFT only warns about keys that do not fit) and an adapter trained on another base
fails with the modules and shapes at fault. tests/merge/test_lora.py checks equality with
PEFT's `merge_and_unload`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import torch

from bunny.atomic import check_output_folder
from bunny.errors import BunnyError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")
PEFT_PREFIX = "base_model.model."
MAX_LISTED = 10


def find_adapter(path: Path) -> Path:
    """The folder holding adapter_config.json: `path` itself or its `adapter/` subfolder."""
    for folder in (path, path / "adapter"):
        if (folder / ADAPTER_CONFIG).is_file():
            return folder
    raise BunnyError(f"{path} holds no {ADAPTER_CONFIG} (nor adapter/{ADAPTER_CONFIG}); not a LoRA adapter")


def is_reference_lora(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and "mm_vision_tower" in json.loads(config.read_text())


def read_lora(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter config, LoRA tensors with PEFT's prefix removed) of a PEFT adapter folder.
    `.bin` files are read with torch.load(weights_only=True): tensors only, no code."""
    from bunny.convert.weights import load_tensor_file

    config_file = folder / ADAPTER_CONFIG
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise BunnyError(f"cannot read the LoRA adapter config {config_file}: {exc}") from None
    missing = [k for k in ("r", "lora_alpha") if not isinstance(config, dict) or k not in config]
    if missing:
        raise BunnyError(f"the LoRA adapter config {config_file} has no {' or '.join(missing)}")
    files = [folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()]
    if not files:
        raise BunnyError(f"{folder} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}")
    return config, {k.removeprefix(PEFT_PREFIX): v for k, v in load_tensor_file(files[0]).items()}


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter config, LoRA tensors with PEFT's prefix removed, non-LoRA trainables)."""
    from bunny.convert.weights import load_tensor_file

    config, lora = read_lora(folder)
    extra_files = [folder / n for n in NON_LORA if (folder / n).is_file()]
    extra = load_tensor_file(extra_files[0]) if extra_files else {}
    return config, lora, extra


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rule: a pattern key matches a module name ending in it (at a dot boundary).
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(config: dict, module: str) -> float:
    r = _pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def check_supported(config: dict, folder: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise BunnyError(f"{folder}: adapter type {config.get('peft_type')!r} is not LoRA")
    unsupported = [name for name in ("use_dora", "fan_in_fan_out") if config.get(name)]
    if unsupported:
        raise BunnyError(f"{folder}: LoRA options {', '.join(unsupported)} are not supported (bunny folds plain LoRA only)")


@torch.no_grad()
def fold_lora(llm, config: dict, lora: dict[str, torch.Tensor], source: str = "the adapter") -> int:
    """W += scale * B @ A for every adapted nn.Linear of the causal LM `llm` (keys as its
    module names, PEFT's prefix removed; scale from `config`, PEFT's adapter_config fields);
    other adapter tensors (biases trained with bias='all') replace the base's. Every key is
    checked against `llm` first. Returns the number of layers folded."""
    modules = dict(llm.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    plain = {}
    for key, value in lora.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        elif ".lora_" in key:
            raise BunnyError(f"{source}: tensor {key} is not a LoRA A/B weight of a linear layer (unsupported)")
        else:
            plain[key] = value
    if not pairs:
        raise BunnyError(f"{source} holds no LoRA A/B weights (keys ending in lora_A.weight / lora_B.weight)")
    problems = []
    for name, ab in sorted(pairs.items()):
        module = modules.get(name)
        if module is None or not isinstance(module, torch.nn.Linear):
            problems.append(f"{name}: no linear layer of that name in the base LLM")
            continue
        if set(ab) != {"A", "B"}:
            problems.append(f"{name}: has lora_{''.join(sorted(ab))} only")
            continue
        a, b = ab["A"], ab["B"]
        out_f, in_f = module.weight.shape
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            problems.append(f"{name}: A {list(a.shape)} and B {list(b.shape)} do not fit a "
                            f"{in_f} -> {out_f} layer")
    params = dict(llm.named_parameters())
    for key, value in sorted(plain.items()):
        if key not in params:
            problems.append(f"{key}: not a parameter of the base LLM")
        elif params[key].shape != value.shape:
            problems.append(f"{key}: shape {list(value.shape)}, the base has {list(params[key].shape)}")
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise BunnyError(f"{source} was not trained on this base model:\n  " + "\n  ".join(problems[:MAX_LISTED]) + more)
    for name, ab in pairs.items():
        weight = modules[name].weight
        delta = lora_scale(config, name) * (ab["B"].float() @ ab["A"].float())  # (out, in)
        weight.copy_((weight.float() + delta).to(weight.dtype))
    for key, value in plain.items():
        params[key].copy_(value)
    return len(pairs)


@torch.no_grad()
def load_non_lora(model, extra: dict[str, torch.Tensor], source: str) -> None:
    """Projector (and tower) weights trained beside the LoRA, in the bunny model's names."""
    state = model.state_dict()
    problems = [f"{k}: not a tensor of the base model" for k in sorted(extra) if k not in state]
    problems += [f"{k}: shape {list(v.shape)}, the base has {list(state[k].shape)}"
                 for k, v in sorted(extra.items()) if k in state and state[k].shape != v.shape]
    if problems:
        raise BunnyError(f"{source} does not fit the base model:\n  " + "\n  ".join(problems[:MAX_LISTED]))
    for key, value in extra.items():
        state[key].copy_(value)


def load_base(base: str | None, adapter_dir: Path, run_dir: Path, dtype):
    """The model the adapter was trained on: `base`, else the run's recipe.yaml rebuilt exactly
    as training built it (bunny.train.parts.build_for_recipe: LLM and tower at their revisions,
    S2, token pooling, tower size, a stage-1 start)."""
    from bunny.model.loading import load_pretrained

    if base:
        return load_pretrained(base, dtype=dtype)
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise BunnyError(f"no base model for {adapter_dir}: pass --base (the bunny checkpoint or LLM the "
                         f"adapter was trained on); no recipe.yaml found in {run_dir}")
    from bunny.train.parts import build_for_recipe
    from bunny.train.recipe import load_recipe

    # The trained projector comes from the adapter's non-LoRA weights, not the stage-1 file.
    recipe = dataclasses.replace(load_recipe(recipe_file), projector_weights="")
    return build_for_recipe(recipe, dtype)


def merge_lora_adapter(adapter: str | os.PathLike, out: str | os.PathLike, base: str | None = None,
                       dtype: torch.dtype | None = None) -> Path:
    """Fold ADAPTER into its base and write a plain bunny checkpoint to `out`."""
    from bunny.model.loading import save_pretrained

    check_output_folder(out)
    path = Path(adapter)
    if not path.exists():
        raise BunnyError(f"adapter folder not found: {path}")
    if is_reference_lora(path):
        from bunny.convert.reference import convert_reference

        return convert_reference(path, out, model_base=base, dtype=dtype)
    return save_pretrained(*merged_model(find_adapter(path), base, dtype), out)


def merged_model(folder: Path, base: str | None = None, dtype: torch.dtype | None = None):
    """(model, processor): the base of the bunny adapter in `folder` with the adapter folded in.

    QLoRA (a run whose recipe has `quantize_base`): the base is rebuilt in full precision, as
    for any run, and the adapter folded into those weights: dequantise-then-fold, where the
    dequantised weights are the full-precision ones the 4/8-bit base was quantised from (no
    GPU or bitsandbytes needed). The merged model differs from the trained one by the base's
    quantisation error, which the adapter was trained on top of."""
    config, lora, extra = read_adapter(folder)
    check_supported(config, folder)
    run_dir = folder.parent  # a training run's output folder: recipe.yaml beside adapter/
    model, processor = load_base(base, folder, run_dir, dtype)
    fold_lora(model.language_model, config, lora, source=str(folder))
    load_non_lora(model, extra, str(folder))
    model.config.projector_trained = True
    return model, processor
