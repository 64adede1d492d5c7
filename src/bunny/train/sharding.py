"""Fully sharded data-parallel training (FSDP2: torch's `fully_shard`).

Each process keeps 1/N of every parameter (its rows, dim 0), of the gradients and of the
optimizer state; a unit's full weights exist only while it runs. The units are the LLM's
decoder layers (the classes the LLM names in `_no_split_modules`, which is also what
Accelerate's and transformers' wrapping use), then the whole model as the root unit for the
rest: embeddings, head, the tower and the projector.

The tower is not split into units of its own because a text-only micro-batch skips it: a
unit's weights are gathered by a collective call in which every process must take part, so
a process without images would leave the others waiting. The root unit is gathered on
every forward; its parameters that a process did not use get zero gradients
(`set_reduce_scatter_unused_params`), so the gradient reduction matches across processes.

bunny applies `fully_shard` itself rather than through Accelerate's FSDP plugin: Accelerate
1.15 sets FSDP up only for GPU process groups (on a CPU group it drops the plugin without a
word, as it does DeepSpeed's), and one code path on CPU and GPU is what the tests check.
Accelerate still launches the processes, owns the process group and the device, and
autocasts to bf16.

Checkpoints and the exported model hold full (gathered) tensors, in the same files as an
unsharded run, so a run may resume with another number of processes.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from bunny.errors import BunnyError


def layer_classes(module: nn.Module) -> set[str]:
    return set(getattr(module, "_no_split_modules", None) or [])


def units(model) -> list[nn.Module]:
    """The LLM's layers, sharded one by one, innermost first (fully_shard goes bottom-up)."""
    llm_classes = layer_classes(model.language_model)
    llm_units = [m for m in model.language_model.modules() if type(m).__name__ in llm_classes]
    if not llm_units:
        raise BunnyError(f"fsdp: the LLM {type(model.language_model).__name__} names no layer classes to shard "
                         f"(its _no_split_modules is {getattr(model.language_model, '_no_split_modules', None)!r}, "
                         "or no module is of those classes), so its layers cannot be wrapped one by one; "
                         "train it without fsdp, or with DeepSpeed ZeRO-3 on GPUs")
    # Innermost first: a unit inside another must be sharded before the one holding it.
    depth = {id(m): name.count(".") for name, m in model.named_modules()}
    return sorted(llm_units, key=lambda m: -depth[id(m)])


def meta_skeleton(model) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory): the frame that
    the gathered weights are put into at export. Buffers are copied for real, since the
    non-persistent ones (rotary frequencies) are in no state dict."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def shard(model, groups: list[dict], reshard_after_forward: bool = True) -> list[dict]:
    """Shard `model` in place across the default process group; returns `groups` (optimizer
    parameter groups) pointing at the sharded parameters, which replace the originals."""
    from torch.distributed.fsdp import fully_shard

    # Every process's backward must reach the units in the same order; the LLM's input
    # embeddings require grad on all of them, whether or not image features flowed into them.
    model.language_model.enable_input_require_grads()
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in groups]
    for unit in units(model):
        fully_shard(unit, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    model.set_reduce_scatter_unused_params(True)
    params = dict(model.named_parameters())
    return [{**g, "params": [params[n] for n in ns]} for g, ns in zip(groups, group_names)]


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload with full_state_dict: only the main process receives the tensors.
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def gather_trainable(model) -> dict[str, torch.Tensor]:
    """The full trainable parameters (collective: every process calls; the main process gets
    the tensors, the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=_full_options())
    return {k: v for k, v in state.items() if k in trainable}


def gather_optimizer(model, optimizer) -> dict:
    """The optimizer state, full and keyed by parameter name (collective, as gather_trainable)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_full(model, optimizer, trainable: dict[str, torch.Tensor], optim_state: dict) -> None:
    """Put full (gathered) trainables and optimizer state into the sharded model and
    optimizer; every process passes the same full dicts and keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, trainable, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))


def gathered_model(model, skeleton: nn.Module | None):
    """The trained model, whole, in `skeleton` on the main process (None elsewhere).
    Collective: every process calls."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())
    if skeleton is None:
        return None
    missing, unexpected = skeleton.load_state_dict(state, assign=True, strict=False)
    if unexpected or any(p.is_meta for p in skeleton.parameters()):
        raise BunnyError(f"fsdp: the gathered weights do not fit the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return skeleton


def local_numel(model) -> tuple[int, int]:
    """(elements of the parameters this process holds, elements of the whole model)."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in model.parameters():
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        total += p.numel()
    return local, total


def optimizer_local_numel(optimizer) -> int:
    """Elements of optimizer state (AdamW's moments) this process holds."""
    from torch.distributed.tensor import DTensor

    n = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                n += value.to_local().numel() if isinstance(value, DTensor) else value.numel()
    return n


def holdings(model, optimizer) -> dict:
    """What this process holds (elements, measured from its local shards) against the whole."""
    local, total = local_numel(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_local": local, "params_total": total, "optim_local": optimizer_local_numel(optimizer),
            "optim_total": 2 * trainable}  # AdamW: two moments per trainable element
