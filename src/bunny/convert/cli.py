"""`bunny convert reference SRC OUT [--model-base PATH] [--dtype D]`."""
from __future__ import annotations

from bunny.cli import get_group

DTYPES = ("float32", "float16", "bfloat16")


def add_parsers(sub, groups) -> None:
    convert = get_group(sub, groups, "convert", help="convert checkpoints of other formats to bunny's")
    p = convert.add_parser(
        "reference",
        help="a BAAI Bunny checkpoint (stage 1, LoRA, merged or hub layout) -> a bunny checkpoint",
    )
    p.add_argument("src", help="reference checkpoint folder")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--model-base", default=None,
                   help="base LLM folder for stage-1 and LoRA checkpoints (default: the config's _name_or_path)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype of the output (default float32)")
    p.set_defaults(func=_run_reference)


def _run_reference(args) -> int:
    import torch

    from bunny.convert.reference import convert_reference

    out = convert_reference(args.src, args.out, model_base=args.model_base, dtype=getattr(torch, args.dtype))
    print(f"wrote {out}")
    return 0
