"""Quantised serving: int8 dynamic linear layers on the CPU, bitsandbytes 8/4-bit on GPU.

Only the LLM's `nn.Linear` layers are quantised (they hold almost all of a Bunny's compute
and, apart from the embedding table, its weights); the vision tower and projector stay in
their own dtype, since image features are computed once per image.
"""
from __future__ import annotations

import torch
from torch import nn

from bunny.errors import BunnyError

MODES = ("int8", "8bit", "4bit")


def quantize_model(model, mode: str, device: str | torch.device = "cpu"):
    """Quantise `model.language_model` in place for `device`; returns the model."""
    if mode not in MODES:
        raise BunnyError(f"unknown quantisation {mode!r}; choose one of {', '.join(MODES)}")
    device = torch.device(device)
    if mode == "int8":
        if device.type != "cpu":
            raise BunnyError("--quantize int8 (dynamic int8) runs on the CPU only; on GPU use 8bit or 4bit")
        if model.language_model.dtype != torch.float32:
            raise BunnyError("dynamic int8 quantisation needs a float32 model (load without --dtype)")
        # Weights become int8 (one scale per output channel); activations are quantised on the fly per batch.
        # (torch.ao quantisation is deprecated in torch 2.14 but still works; it warns once.)
        # Per-channel scales and a float head: per-tensor scales, or an int8 copy of a head tied to the
        # embeddings, changed most greedy tokens of SmolLM2-135M (docs/serving.md has the figures).
        lm = model.language_model
        head = lm.get_output_embeddings()
        spec = {name: torch.ao.quantization.per_channel_dynamic_qconfig for name, module in lm.named_modules()
                if isinstance(module, nn.Linear) and module is not head}
        torch.ao.quantization.quantize_dynamic(lm, spec, dtype=torch.qint8, inplace=True)
        return model
    return _bitsandbytes(model, mode, device)


def _bitsandbytes(model, mode: str, device: torch.device):
    if device.type != "cuda" or not torch.cuda.is_available():
        raise BunnyError(f"--quantize {mode} needs a CUDA GPU (bitsandbytes); on the CPU use --quantize int8")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise BunnyError(f"--quantize {mode} needs bitsandbytes: pip install bitsandbytes") from None
    compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def replacement(linear: nn.Linear) -> nn.Module:
        bias = linear.bias is not None
        if mode == "8bit":
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                      threshold=6.0)
            new.weight = bnb.nn.Int8Params(linear.weight.data.to(compute_dtype), requires_grad=False,
                                           has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                    quant_type="nf4")
            new.weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype), requires_grad=False, quant_type="nf4")
        if bias:
            new.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        return new

    lm = model.language_model
    for parent in list(lm.modules()):
        for name, child in list(parent.named_children()):
            # The head stays in 16 bits: it is tied to the embeddings in many small LLMs.
            if isinstance(child, nn.Linear) and child is not lm.get_output_embeddings():
                setattr(parent, name, replacement(child))
    model.to(compute_dtype)
    model.to(device)  # moving bitsandbytes parameters to the GPU quantises them
    return model
