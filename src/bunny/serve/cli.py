"""`bunny chat` (and the serving commands)."""
from __future__ import annotations

from bunny.model.dtypes import DTYPES  # light: no torch
from bunny.serve.llamacpp_engine import add_engine_arguments, check_engine_arguments  # light: no torch

MODEL_HELP = "bunny checkpoint, reference checkpoint or plain LLM: a local folder, a hub id (ORG/NAME), or smollm2-135m"
REVISION_HELP = "branch, tag or commit of a --model given by hub id (default: the repo's main branch)"
MODEL_BASE_HELP = "base LLM (folder or hub id) of a stage-1 / LoRA reference checkpoint"
VISION_TOWER_HELP = ("tower (folder, preset or hub id) in place of a reference checkpoint's mm_vision_tower, "
                     "for one that names a folder not on this machine (Bunny-v1_1-4B)")


def add_quantize_arguments(p) -> None:
    """--quantize and --group-size, as chat, serve and eval run take them (bunny.serve.quantize
    MODES and GROUP_SIZES, spelled out here so that building the parser imports no torch)."""
    p.add_argument("--quantize", choices=["int8", "int4", "8bit", "4bit"],
                   help="int8 / int4: weight-only (the LLM's linear layers and vocabulary head; any device; "
                        "less memory); 8bit / 4bit: bitsandbytes (CUDA GPU). docs/serving.md, Quantised loading")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128],
                   help="--quantize int8 / int4: inputs sharing one scale (int4 default 64; "
                        "int8 default: one scale per output channel)")


def add_dtype_argument(p) -> None:
    """--dtype, as chat, serve and eval run take it (refused where it should not run: bunny.model.dtypes)."""
    p.add_argument("--dtype", choices=DTYPES,
                   help="weight dtype (default: the checkpoint's); bfloat16 on a CPU needs AVX512-BF16 or AMX. "
                        "--engine llama.cpp: the type of the export it runs (f32, bf16, f16; default f32)")


def add_parsers(sub, groups) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (or answer one --prompt)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--revision", help=REVISION_HELP)
    p.add_argument("--image", help="image file to talk about")
    p.add_argument("--prompt", help="answer this one question, print the answer and exit")
    p.add_argument("--template", help="override the checkpoint's template (bunny, phi3, llama, minicpm, plain, native)")
    p.add_argument("--model-base", help=MODEL_BASE_HELP)
    p.add_argument("--vision-tower", help=VISION_TOWER_HELP)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu")
    add_dtype_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="decode with a static KV cache and a torch.compile'd step (compiled once per process; "
                        "docs/serving.md, Decode)")
    add_quantize_arguments(p)
    add_engine_arguments(p)
    p.set_defaults(func=_chat)
    add_serve_parser(sub)


def _chat(args) -> int:
    from bunny.model.generation import SamplingSettings
    from bunny.serve.chat import run_chat
    from bunny.serve.quantize import load_quantized

    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, compile=args.compile)
    check_engine_arguments(args, {"--device": args.device, "--revision": args.revision,
                                  "--model-base": args.model_base, "--vision-tower": args.vision_tower,
                                  "--compile": args.compile, "--quantize": args.quantize,
                                  "--group-size": args.group_size})
    if args.engine == "llama.cpp":
        from bunny.serve.llamacpp_engine import export_outtype, open_engine

        engine, processor = open_engine(args.model, args.gguf, args.mmproj, export_outtype(args.dtype, args.gguf),
                                        template=args.template)
        return run_chat(engine, processor, settings, image=args.image, prompt=args.prompt)
    import torch

    from bunny.model.dtypes import check_dtype

    check_dtype(args.dtype, args.device)
    model, processor = load_quantized(args.model, args.quantize, args.group_size, args.device,
                                      model_base=args.model_base, template=args.template, revision=args.revision,
                                      vision_tower=args.vision_tower,
                                      dtype=getattr(torch, args.dtype) if args.dtype else None)
    return run_chat(model, processor, settings, image=args.image, prompt=args.prompt)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a web demo at /")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--revision", help=REVISION_HELP)
    p.add_argument("--served-model-name", help="the model id clients send (default: the --model value's name)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (env BUNNY_API_KEY)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    p.add_argument("--max-new-tokens-cap", type=int, default=1024, help="largest max_tokens accepted")
    p.add_argument("--max-images", type=int, default=4, help="images per request")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    p.add_argument("--max-body-mb", type=float, default=20.0)
    p.add_argument("--allow-remote-images", action="store_true",
                   help="also fetch http(s) image URLs (size and time limited); off: data: URLs only")
    add_quantize_arguments(p)
    p.add_argument("--template", help="override the checkpoint's template")
    p.add_argument("--model-base", help=MODEL_BASE_HELP)
    p.add_argument("--vision-tower", help=VISION_TOWER_HELP)
    p.add_argument("--device", default="cpu")
    add_dtype_argument(p)
    add_engine_arguments(p)
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import os
    from pathlib import Path

    from bunny.model.loading import fetch_model
    from bunny.serve.server import serve

    check_engine_arguments(args, {"--device": args.device, "--revision": args.revision, "--quantize": args.quantize,
                                  "--group-size": args.group_size, "--model-base": args.model_base,
                                  "--vision-tower": args.vision_tower})
    from bunny.model.dtypes import check_dtype

    if args.engine == "torch":
        check_dtype(args.dtype, args.device)
    serve(fetch_model(args.model, args.revision), host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get("BUNNY_API_KEY"),
          served_model_name=args.served_model_name or Path(args.model.rstrip("/")).name,
          max_batch_size=args.max_batch_size, max_queue=args.max_queue,
          max_new_tokens_cap=args.max_new_tokens_cap, max_images=args.max_images,
          max_image_pixels=args.max_image_pixels, max_body_bytes=int(args.max_body_mb * 2**20),
          allow_remote_images=args.allow_remote_images, quantize=args.quantize, group_size=args.group_size,
          template=args.template,
          model_base=args.model_base, vision_tower=args.vision_tower, device=args.device, dtype=args.dtype,
          engine=args.engine, gguf=args.gguf, mmproj=args.mmproj)
    return 0
