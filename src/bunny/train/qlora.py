"""QLoRA: stage-2 LoRA on a frozen LLM held in 4 or 8 bits (recipe field `quantize_base`).

The LLM is loaded through transformers' `BitsAndBytesConfig` (bitsandbytes): `4bit` is NF4
with double quantisation and bf16 compute, as in the QLoRA paper; `8bit` is LLM.int8. Then
PEFT's `prepare_model_for_kbit_training` (layer norms and embeddings in float32, input
gradients for checkpointing), then LoRA on every linear layer as in any LoRA run. The tower
and the projector are not quantised; the projector trains in float32.

The adapter is trained against the quantised weights; the model written at the end (and by
`bunny merge lora`) folds it into the full-precision base weights (bunny.merge.lora), since
folding into NF4 blocks is not possible without re-quantising.

bitsandbytes needs a CUDA GPU; it is imported only here, only when a recipe asks for it,
and is not among bunny's dependencies (pip install bitsandbytes on the GPU machine).
`check` runs before anything is built or written.
"""
from __future__ import annotations

import importlib.util

import torch

from bunny.errors import BunnyError
from bunny.train.recipe import Recipe


def check(recipe: Recipe) -> None:
    """Every reason this recipe's QLoRA cannot run here, as one error (nothing for a recipe
    without quantize_base)."""
    if not recipe.quantize_base:
        return
    field = f"quantize_base: {recipe.quantize_base}"
    if recipe.stage != "finetune" or recipe.tune != "lora":
        raise BunnyError(f"{field} quantises the frozen LLM under LoRA: it needs stage finetune and tune lora "
                         f"(got stage {recipe.stage}, tune {recipe.tune})")
    if recipe.fsdp or recipe.deepspeed:
        raise BunnyError(f"{field} with {'fsdp' if recipe.fsdp else 'deepspeed'} is not supported: a quantised "
                         "base is not sharded; train QLoRA with plain data parallelism (one copy per GPU)")
    if recipe.init_from and not _stage1_start(recipe):
        raise BunnyError(f"{field}: init_from {recipe.init_from} is a whole bunny checkpoint; QLoRA loads the LLM "
                         "by itself through bitsandbytes, so start from `llm:` + `tower:` (+ projector_weights) or "
                         "from a stage-1 output folder")
    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible (bitsandbytes' 4-bit and 8-bit kernels need one)")
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if problems:
        raise BunnyError(f"{field} cannot train here: {'; '.join(problems)}. Remove quantize_base to train LoRA "
                         "on the full-precision LLM, or run on a GPU machine with bitsandbytes")


def _stage1_start(recipe: Recipe) -> bool:
    from bunny.train.parts import stage1_projector_file

    return stage1_projector_file(recipe.init_from) is not None


def bnb_config(mode: str):
    """transformers' BitsAndBytesConfig for quantize_base `4bit` or `8bit`."""
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise BunnyError(f"quantize_base {mode!r} is not valid; choose 4bit or 8bit")


def base_llm(recipe: Recipe) -> tuple[str, str | None]:
    """(llm, revision) the run's base LLM is loaded from: the recipe's, or its stage-1 start's."""
    if recipe.init_from:
        from pathlib import Path

        from bunny.train.parts import _stage1_recipe

        stage1 = _stage1_recipe(Path(recipe.init_from), "or start from `llm:` and `tower:`")
        return stage1.llm, stage1.llm_revision or None
    return recipe.llm, recipe.llm_revision or None


def build(recipe: Recipe, device: torch.device):
    """(model, processor) for a QLoRA run: built as any stage 2 (tower, projector, tokenizer,
    settings) in bf16, then the LLM replaced by its quantised load on `device`."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from bunny.model.embedded import resolve_llm
    from bunny.model.loading import fit_vocabulary
    from bunny.train.parts import build_for_recipe

    check(recipe)
    model, processor = build_for_recipe(recipe, dtype=torch.bfloat16)
    llm, revision = base_llm(recipe)
    quantised = AutoModelForCausalLM.from_pretrained(resolve_llm(llm, revision), dtype=torch.bfloat16,
                                                     quantization_config=bnb_config(recipe.quantize_base),
                                                     device_map={"": device})
    fit_vocabulary(quantised, processor.tokenizer, llm)
    quantised = prepare_model_for_kbit_training(quantised, use_gradient_checkpointing=recipe.gradient_checkpointing)
    model.language_model = quantised
    model.mm_projector.float()
    if recipe.unfreeze_tower:
        model.vision_tower.float()
    model.vision_tower.to(device)
    model.mm_projector.to(device)
    return model, processor
