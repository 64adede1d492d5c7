"""Merging a reference LoRA adapter into its LLM, strictly.

The reference wrapped the whole Bunny model with PEFT before the tower and projector were
attached, so the adapter's keys name only LLM layers, in the LLM's own module tree
(`base_model.model.model.layers.N...lora_A.weight`): they apply unchanged to the plain
Hugging Face causal LM. `PeftModel.from_pretrained` only warns about adapter keys that do
not fit, so the weights are set here and every key is checked.
"""
from __future__ import annotations

from pathlib import Path

from bunny.errors import BunnyError

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def merge_lora(language_model, folder: Path):
    """W <- W + (alpha / r) * B @ A for every adapted layer; returns the plain LLM."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from bunny.convert.weights import load_tensor_file

    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise BunnyError(f"cannot read the LoRA adapter config {folder / 'adapter_config.json'}: {exc}") from None
    files = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not files:
        raise BunnyError(f"{folder} has adapter_config.json but no {' or '.join(ADAPTER_WEIGHTS)}")
    weights = load_tensor_file(files[0])
    config.inference_mode = True
    try:
        peft_model = get_peft_model(language_model, config)
    except ValueError as exc:  # target modules that the LLM lacks
        raise BunnyError(f"the LoRA adapter in {folder} does not fit the LLM: {exc}") from None
    result = set_peft_model_state_dict(peft_model, weights)
    missing = sorted(k for k in result.missing_keys if "lora_" in k)
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise BunnyError(
            f"{files[0]} does not match the LLM it adapts; missing keys: {', '.join(missing[:12]) or 'none'}; "
            f"unexpected keys: {', '.join(unexpected[:12]) or 'none'}"
        )
    return peft_model.merge_and_unload()
