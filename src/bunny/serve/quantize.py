"""Quantised serving: weight-only int8 / int4 linear layers (any device), bitsandbytes 8/4-bit on GPU.

Only the LLM's `nn.Linear` layers are quantised (they hold almost all of a Bunny's compute
and, apart from the embedding table, its weights); the vision tower and projector stay in
their own dtype, since image features are computed once per image. The vocabulary head stays
as it is: in most small LLMs it is tied to the embedding table, so a quantised head would be a
second copy of that table (more memory, not less).

Weight-only means the activations stay in the model's float dtype: each forward dequantises
the weight (plain torch ops) and runs an ordinary float `linear`. The stored weight is 1 byte
(int8) or half a byte (int4) per value, each within half a quantisation step of the original.
How many answers stay the same depends on the model's weights (docs/benchmarks.md, "Weight-only
quantisation"). On a CPU the dequantisation costs time: these modes save memory, they do not
make decoding faster (`--engine llama.cpp` is the fast CPU path).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bunny.errors import BunnyError

MODES = ("int8", "int4", "8bit", "4bit")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # divides the inputs of more small LLMs than 128 does (SmolLM2-135M: 576)


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (q * scale)^T + bias, with q int8 in [-127, 127] (out, in) and float32 scales
    (absmax / 127): one per output channel, or with `group_size` one per group of that many
    consecutive inputs of a row. The dequantised weight is within scale / 2 of the original."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.group_size = group_size
        self.register_buffer("qweight", qweight)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) float32, or (out, in / group) with groups
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> "Int8WeightOnlyLinear":
        out_f, in_f = linear.weight.shape
        w = linear.weight.detach().float().reshape(out_f, -1, group_size or in_f)  # (out, groups, group)
        scale = w.abs().amax(dim=2) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
        q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8).reshape(out_f, in_f)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale if group_size else scale[:, 0], bias, group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.group_size is None:
            return (self.qweight.float() * self.scale[:, None]).to(dtype)
        w = self.qweight.float().reshape(self.out_features, -1, self.group_size) * self.scale[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.group_size is not None:
            return F.linear(x, self.dequantize(x.dtype), bias)
        # One scale per output channel is applied to the output: (out,) products instead of (out, in).
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class Int4WeightOnlyLinear(nn.Module):
    """Asymmetric int4 with one (scale, minimum) pair per `group_size` consecutive inputs of a row:
    w ~= q * scale + minimum, q in [0, 15], two values packed per byte (low nibble first). The
    dequantised weight is within scale / 2 of the original."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int):
        super().__init__()
        self.out_features = packed.shape[0]
        self.in_features = packed.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("packed", packed)  # (out, in / 2) uint8
        self.register_buffer("scale", scale)  # (out, in / group) float32
        self.register_buffer("minimum", minimum)  # (out, in / group) float32
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4WeightOnlyLinear":
        out_f, in_f = linear.weight.shape
        w = linear.weight.detach().float().reshape(out_f, in_f // group_size, group_size)
        lo, hi = w.amin(dim=2), w.amax(dim=2)
        scale = (hi - lo) / 15
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group is exact
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).reshape(out_f, in_f)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, scale, lo, bias, group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = torch.stack([self.packed & 0xF, self.packed >> 4], dim=-1)  # (out, in / 2, 2)
        q = q.reshape(self.out_features, -1, self.group_size).float()  # (out, groups, group)
        w = q * self.scale[..., None] + self.minimum[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def quantize_model(model, mode: str, device: str | torch.device = "cpu", group_size: int | None = None):
    """Quantise `model.language_model` in place for `device`; returns the model.

    int8 / int4: weight-only (this module's layers), on the model's current device; `group_size`
    (32, 64 or 128) inputs share one scale: int4 default 64, int8 default one scale per output
    channel. 8bit / 4bit: bitsandbytes on a CUDA GPU."""
    if mode not in MODES:
        raise BunnyError(f"unknown quantisation {mode!r}; choose one of {', '.join(MODES)}")
    device = torch.device(device)
    if mode in ("int8", "int4"):
        if mode == "int4" and group_size is None:
            group_size = DEFAULT_GROUP_SIZE
        if group_size is not None:
            _check_groups(model, mode, group_size)
        if mode == "int8":
            _replace_linears(model, lambda linear: Int8WeightOnlyLinear.from_linear(linear, group_size))
        else:
            _replace_linears(model, lambda linear: Int4WeightOnlyLinear.from_linear(linear, group_size))
        return model
    if group_size is not None:
        raise BunnyError(f"a group size applies to --quantize int8 and int4 only, not {mode}")
    return _bitsandbytes(model, mode, device)


def _check_groups(model, mode: str, group_size: int) -> None:
    """Every layer checked before any is replaced: a refusal leaves the model as it was."""
    if group_size not in GROUP_SIZES:
        raise BunnyError(f"{mode} group size {group_size} is not supported; choose one of "
                         f"{', '.join(map(str, GROUP_SIZES))}")
    for name, linear in _llm_linears(model):
        if linear.in_features % group_size:
            raise BunnyError(f"--quantize {mode} with group size {group_size}: layer {name!r} has "
                             f"{linear.in_features} inputs, not a multiple of {group_size}; "
                             f"choose a group size that divides it ({', '.join(map(str, GROUP_SIZES))})")


def _llm_linears(model) -> list[tuple[str, nn.Linear]]:
    """(qualified name, layer) of every `nn.Linear` of the LLM except its vocabulary head."""
    lm = model.language_model
    head = lm.get_output_embeddings()
    return [(f"language_model.{name}", m) for name, m in lm.named_modules()
            if isinstance(m, nn.Linear) and m is not head]


def _replace_linears(model, make) -> None:
    lm = model.language_model
    head = lm.get_output_embeddings()
    with torch.no_grad():
        for parent in list(lm.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child is not head:
                    setattr(parent, name, make(child))


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by `module`'s parameters and buffers, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


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

    # The head stays in 16 bits: it is tied to the embeddings in many small LLMs.
    _replace_linears(model, replacement)
    model.to(compute_dtype)
    model.to(device)  # moving bitsandbytes parameters to the GPU quantises them
    return model
