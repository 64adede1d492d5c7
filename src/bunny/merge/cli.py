"""`bunny merge lora ADAPTER --out DIR [--base MODEL]` and
`bunny merge average M1 M2 [...] --weights W1 W2 [...] --out DIR`."""
from __future__ import annotations

from bunny.cli import get_group

DTYPES = ("float32", "float16", "bfloat16")


def add_parsers(sub, groups) -> None:
    merge = get_group(sub, groups, "merge", help="fold LoRA adapters into weights, average models")
    p = merge.add_parser("lora", help="fold a LoRA adapter (+ its non-LoRA trainables) into its base model")
    p.add_argument("adapter", help="adapter folder, a training run folder holding adapter/, or a reference LoRA folder")
    p.add_argument("--out", required=True, help="output bunny checkpoint folder (written atomically)")
    p.add_argument("--base", default=None,
                   help="base model the adapter was trained on, a folder or hub id "
                        "(default: the run's recipe.yaml init_from / llm + tower)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a --base given by hub id (default: main)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default: the base's)")
    p.set_defaults(func=_run_lora)

    p = merge.add_parser("average", help="weighted average of every tensor of two or more models (streamed)")
    p.add_argument("models", nargs="+", help="model folders (safetensors); config and tokenizer come from the last")
    p.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per model, summing to 1")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--allow-unnormalized", action="store_true", help="allow weights that do not sum to 1")
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard (default 2GB)")
    p.set_defaults(func=_run_average)


def _run_lora(args) -> int:
    import torch

    from bunny.errors import BunnyError
    from bunny.merge.lora import merge_lora_adapter
    from bunny.model.loading import fetch_model

    if args.revision and not args.base:
        raise BunnyError("--revision applies to a --base given by hub id; no --base was given")
    base = fetch_model(args.base, args.revision) if args.base else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(f"wrote {merge_lora_adapter(args.adapter, args.out, base=base, dtype=dtype)}")
    return 0


def _run_average(args) -> int:
    from bunny.merge.average import average_models

    out = average_models(args.models, args.weights, args.out, allow_unnormalized=args.allow_unnormalized,
                         max_shard_size=args.max_shard_size)
    print(f"wrote {out}")
    return 0
