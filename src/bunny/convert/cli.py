"""`bunny convert reference SRC OUT [--model-base PATH] [--dtype D]`, and
`bunny export llava-hf MODEL OUT` / `bunny export gguf MODEL OUT [--outtype f16]`."""
from __future__ import annotations

from bunny.cli import get_group

DTYPES = ("float32", "float16", "bfloat16")
REVISION_HELP = "branch, tag or commit of a {what} given by hub id (default: the repo's main branch)"


def add_parsers(sub, groups) -> None:
    convert = get_group(sub, groups, "convert", help="convert checkpoints of other formats to bunny's")
    p = convert.add_parser(
        "reference",
        help="a BAAI Bunny checkpoint (stage 1, LoRA, merged or hub layout) -> a bunny checkpoint",
    )
    p.add_argument("src", help="reference checkpoint: a local folder or a hub id (ORG/NAME)")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--revision", default=None, help=REVISION_HELP.format(what="SRC"))
    p.add_argument("--model-base", default=None,
                   help="base LLM (folder or hub id) of stage-1 and LoRA checkpoints "
                        "(default: the config's _name_or_path)")
    p.add_argument("--vision-tower", default=None,
                   help="tower (folder, preset or hub id) in place of the config's mm_vision_tower, for one that "
                        "cannot be found (Bunny-v1_1-4B names a folder on its authors' machine)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype of the output (default float32)")
    p.set_defaults(func=_run_reference)
    add_export_parsers(sub, groups)


def _run_reference(args) -> int:
    import torch

    from bunny.convert.reference import convert_reference
    from bunny.model.loading import fetch_model

    out = convert_reference(fetch_model(args.src, args.revision), args.out, model_base=args.model_base,
                            dtype=getattr(torch, args.dtype), vision_tower=args.vision_tower)
    print(f"wrote {out}")
    return 0


def add_export_parsers(sub, groups) -> None:
    export = get_group(sub, groups, "export", help="export bunny checkpoints for other engines")
    p = export.add_parser("llava-hf", help="a transformers LlavaForConditionalGeneration folder (vLLM, SGLang, TGI)")
    p.add_argument("model", help="bunny checkpoint (or anything `bunny chat` loads): a local folder or a hub id")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--revision", default=None, help=REVISION_HELP.format(what="MODEL"))
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default: the checkpoint's)")
    p.set_defaults(func=_run_llava_hf)
    p = export.add_parser("gguf", help="llama.cpp GGUF files: the LLM and the tower + projector (mmproj)")
    p.add_argument("model", help="bunny checkpoint: a local folder or a hub id")
    p.add_argument("out", help="output folder: model-<outtype>.gguf and mmproj-model-<outtype>.gguf")
    p.add_argument("--revision", default=None, help=REVISION_HELP.format(what="MODEL"))
    p.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), default="f16",
                   help="tensor type of the LLM's matrices (default f16; bf16: a bf16 checkpoint's weights "
                        "exactly; q8_0: llama.cpp's 8-bit blocks; with bf16 and q8_0 the mmproj file is f32)")
    p.set_defaults(func=_run_gguf)


def _run_llava_hf(args) -> int:
    import torch

    from bunny.atomic import check_output_folder
    from bunny.convert.export_llava import export_llava_hf
    from bunny.model.loading import fetch_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    check_output_folder(args.out)  # before a hub download
    print(f"wrote {export_llava_hf(fetch_model(args.model, args.revision), args.out, dtype=dtype)}")
    return 0


def _run_gguf(args) -> int:
    from bunny.atomic import check_output_folder
    from bunny.convert.export_gguf import export_gguf
    from bunny.model.loading import fetch_model

    check_output_folder(args.out)  # before a hub download
    for path in export_gguf(fetch_model(args.model, args.revision), args.out, outtype=args.outtype):
        print(f"wrote {path}")
    return 0
