"""Merging a reference LoRA adapter into its LLM, strictly.

The reference wrapped the whole Bunny model with PEFT before the tower and projector were
attached, so the adapter's keys name only LLM layers, in the LLM's own module tree
(`base_model.model.model.layers.N...lora_A.weight`): they apply unchanged to the plain
Hugging Face causal LM. They are folded with bunny's one LoRA fold (bunny.merge.lora.fold_lora),
which checks every key against the LLM (`PeftModel.from_pretrained` only warns about keys
that do not fit).
"""
from __future__ import annotations

from pathlib import Path


def merge_lora(language_model, folder: Path):
    """W <- W + (alpha / r) * B @ A for every adapted layer; returns the plain LLM."""
    from bunny.merge.lora import check_supported, fold_lora, read_lora

    config, lora = read_lora(folder)
    check_supported(config, folder)
    fold_lora(language_model, config, lora, source=str(folder))
    return language_model
