"""Quantised serving: weight-only int8 / int4 linear layers (any device), bitsandbytes 8/4-bit on GPU.

The LLM's `nn.Linear` layers and its vocabulary head are quantised (they hold almost all of a
Bunny's compute and weights); the vision tower and projector stay in their own dtype, since image
features are computed once per image. When the head is tied to the input embeddings (most small
LLMs), the embedding table becomes a lookup into the quantised head, so the model keeps one
table, as llama.cpp's quantised GGUFs do; an untied or scaled embedding stays as it is (a token
reads one row of it, which costs no decode time).

Weight-only means the activations stay in the model's float dtype. int8 with one scale per output
channel multiplies by the integer weights converted to float and scales the outputs (reading 1
byte per weight instead of 4); grouped scales and int4 dequantise the weight first. How many
answers stay the same depends on the model's weights, and the speed on the CPU's kernels
(docs/benchmarks.md, "Weight-only quantisation").
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

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) float weight, in `dtype` (default: the scales' dtype)."""
        return self.rows(None, dtype)

    def rows(self, ids: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows `ids` (any shape) of the dequantised weight, (*ids.shape, in); all rows for None.
        One float tensor is allocated and scaled in place: on the CPU each large temporary costs
        fresh pages."""
        q, scale = (self.qweight, self.scale) if ids is None else (self.qweight[ids], self.scale[ids])
        w = q.to(dtype or self.scale.dtype)
        if self.group_size is None:
            return w.mul_(scale[..., None].to(w.dtype))
        w.view(*q.shape[:-1], -1, self.group_size).mul_(scale[..., None].to(w.dtype))
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.group_size is not None:
            return F.linear(x, self.rows(None, x.dtype), bias)
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

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) float weight, in `dtype` (default: the scales' dtype)."""
        return self.rows(None, dtype)

    def rows(self, ids: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows `ids` (any shape) of the dequantised weight, (*ids.shape, in); all rows for None."""
        packed, scale, minimum = ((self.packed, self.scale, self.minimum) if ids is None
                                  else (self.packed[ids], self.scale[ids], self.minimum[ids]))
        dtype = dtype or self.scale.dtype
        w = torch.empty(*packed.shape, 2, dtype=dtype, device=packed.device)  # (..., in / 2, 2)
        w[..., 0] = packed & 0xF  # low nibble first
        w[..., 1] = packed >> 4
        groups = w.view(*packed.shape[:-1], -1, self.group_size)
        groups.mul_(scale[..., None].to(dtype)).add_(minimum[..., None].to(dtype))
        return w.view(*packed.shape[:-1], self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rows(None, x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class QuantizedEmbedding(nn.Module):
    """Input embeddings that read their rows from a quantised vocabulary head holding the same
    (tied) table: token ids -> the head's dequantised rows."""

    def __init__(self, head: Int8WeightOnlyLinear | Int4WeightOnlyLinear, padding_idx: int | None = None):
        super().__init__()
        self.head = head
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head.rows(input_ids)


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
        # The head is int8 with one scale per vocabulary row in every mode: the next token is its argmax,
        # so it is kept finer than int4 (llama.cpp's quantisations keep their output tensor finer too).
        head = Int8WeightOnlyLinear.from_linear
        if mode == "int8":
            _replace_linears(model, lambda linear: Int8WeightOnlyLinear.from_linear(linear, group_size), head)
        else:
            _replace_linears(model, lambda linear: Int4WeightOnlyLinear.from_linear(linear, group_size), head)
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
    """(qualified name, layer) of every `nn.Linear` of the LLM except its vocabulary head (which
    has one scale per row in every mode)."""
    lm = model.language_model
    head = lm.get_output_embeddings()
    return [(f"language_model.{name}", m) for name, m in lm.named_modules()
            if isinstance(m, nn.Linear) and m is not head]


def _replace_linears(model, make, head=None) -> None:
    """Replace the LLM's linear layers by `make(layer)`; with `head` (a function of the layer), the
    vocabulary head by `head(layer)`, and input embeddings tied to it (a plain `nn.Embedding`) by
    a lookup into the replaced head."""
    lm = model.language_model
    old_head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
    tied = type(embedding) is nn.Embedding and old_head is not None and embedding.weight is old_head.weight
    replaced = {}
    with torch.no_grad():
        for parent in list(lm.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and (head or child is not old_head):
                    replaced[id(child)] = (head if child is old_head else make)(child)
                    setattr(parent, name, replaced[id(child)])
    if head and tied:
        lm.set_input_embeddings(QuantizedEmbedding(replaced[id(old_head)], embedding.padding_idx))


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
    _replace_linears(model, replacement, head=False)
    model.to(compute_dtype)
    model.to(device)  # moving bitsandbytes parameters to the GPU quantises them
    return model


def check_request(quantize: str | None, group_size: int | None) -> None:
    """Refuse, before anything is loaded, a group size without int8 / int4, and bitsandbytes without a GPU."""
    if group_size is not None and quantize not in ("int8", "int4"):
        raise BunnyError(f"--group-size {group_size} applies with --quantize int8 or int4"
                         + (f", not {quantize}" if quantize else ""))
    if quantize in ("8bit", "4bit") and not torch.cuda.is_available():
        raise BunnyError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes); on the CPU use --quantize int8")


def describe(quantize: str | None, group_size: int | None) -> str | None:
    """The quantisation as one name: "int8", "int8/g32", "int4/g64" (int4's default group spelled out), "4bit"."""
    if quantize == "int4" and group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    return quantize and (f"{quantize}/g{group_size}" if group_size else quantize)


def load_quantized(model: str, quantize: str | None = None, group_size: int | None = None,
                   device: str | torch.device = "cpu", **load_kwargs):
    """`load_pretrained(model, device, **load_kwargs)`, then `quantize_model` when `quantize` is given.
    bitsandbytes quantises while moving to the GPU, so for 8bit / 4bit the model is loaded on the
    CPU first (and refused at once without a GPU)."""
    from bunny.model.loading import load_pretrained

    check_request(quantize, group_size)
    bnb = quantize in ("8bit", "4bit")
    loaded, processor = load_pretrained(model, device="cpu" if bnb else device, **load_kwargs)
    if quantize:
        quantize_model(loaded, quantize, device, group_size=group_size)
    return loaded, processor
