"""`bunny eval ...` subcommands. Thin: parse arguments, call one library function."""
from __future__ import annotations

import json

from bunny.cli import get_group


def add_parsers(sub, groups) -> None:
    group = get_group(sub, groups, "eval", help="Evaluate on the Bunny benchmarks.")
    p = group.add_parser("score", help="Score a predictions JSONL file; prints JSON metrics.")
    p.add_argument("benchmark", metavar="BENCH",
                   help="mme, pope, vqav2, gqa, scienceqa, seed, mmbench or mmmu")
    p.add_argument("predictions", metavar="PREDICTIONS.jsonl")
    p.add_argument("--reference-fallback", action="store_true",
                   help="draw a random answer for unparseable output as the reference does "
                        "(scienceqa, mmmu); default counts it wrong")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference fallback")
    p.set_defaults(func=_score)

    r = group.add_parser("run", help="Answer a benchmark with a model, then score it (or write "
                                     "the submission file of a server-scored split).")
    r.add_argument("benchmark", metavar="BENCH",
                   help="mme, pope, vqav2, gqa, scienceqa, seed, mmbench or mmmu")
    r.add_argument("--model", required=True,
                   help="checkpoint (bunny or reference layout): a local folder or a hub id (ORG/NAME); "
                        "or an embedded LLM name")
    r.add_argument("--revision", help="branch, tag or commit of a --model given by hub id (default: main)")
    r.add_argument("--data", metavar="PATH_OR_HUB_ID",
                   help="folder or file of the hub's parquet files, or a hub dataset id "
                        "(default: the benchmark's lmms-lab / MMMU dataset, downloaded)")
    r.add_argument("--split", help="keep files named SPLIT-*.parquet (testdev, test, dev, ...)")
    r.add_argument("--limit", type=int, help="answer only the first N questions")
    r.add_argument("--batch-size", type=int, default=1,
                   help="questions per generation batch; answers do not depend on it")
    r.add_argument("--share-prefix", action="store_true",
                   help="batch questions about the same image together and run the image once per "
                        "batch (POPE, MME: several questions per image); same answers up to float rounding")
    r.add_argument("--compile", action="store_true",
                   help="decode with a static KV cache and a torch.compile'd step (torch engine; same greedy "
                        "answers; compiled once per batch size and cache length, per process; needs a C++ compiler)")
    r.add_argument("--out", default="outputs/eval",
                   help="folder for predictions, results and submission files")
    r.add_argument("--max-new-tokens", type=int,
                   help="generation budget (default: the reference's, 128; scienceqa 1024)")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    r.add_argument("--reference-fallback", action="store_true",
                   help="draw a random answer for unparseable output as the reference does "
                        "(scienceqa, mmmu); default counts it wrong")
    r.add_argument("--seed", type=int, default=0, help="seed of the reference fallback")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    from bunny.serve.cli import add_dtype_argument, add_quantize_arguments
    from bunny.serve.llamacpp_engine import add_engine_arguments

    add_quantize_arguments(r)
    add_dtype_argument(r)
    add_engine_arguments(r)
    r.set_defaults(func=_run)


def _score(args) -> int:
    from bunny.eval.registry import score_file

    metrics = score_file(args.benchmark, args.predictions,
                         reference_fallback=args.reference_fallback, seed=args.seed)
    print(json.dumps(metrics, sort_keys=False))
    return 0


def _run(args) -> int:
    from bunny.eval.run import run_benchmark
    from bunny.serve.llamacpp_engine import check_engine_arguments, export_outtype, open_engine

    check_engine_arguments(args, {"--device": args.device, "--revision": args.revision,
                                  "--share-prefix": args.share_prefix, "--compile": args.compile,
                                  "--quantize": args.quantize, "--group-size": args.group_size})
    loaded = (open_engine(args.model, args.gguf, args.mmproj, export_outtype(args.dtype, args.gguf))
              if args.engine == "llama.cpp" else None)
    result = run_benchmark(args.benchmark, args.model, revision=args.revision, data=args.data, split=args.split,
                           limit=args.limit, batch_size=args.batch_size, out=args.out,
                           max_new_tokens=args.max_new_tokens,
                           reference_fallback=args.reference_fallback, seed=args.seed,
                           device=args.device, progress=not args.no_progress, share_prefix=args.share_prefix,
                           loaded=loaded, engine=args.engine, compile=args.compile,
                           quantize=args.quantize, group_size=args.group_size, dtype=args.dtype)
    print(open(result.files["results_md"], encoding="utf-8").read(), end="")
    return 0
