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


def _score(args) -> int:
    from bunny.eval.registry import score_file

    metrics = score_file(args.benchmark, args.predictions,
                         reference_fallback=args.reference_fallback, seed=args.seed)
    print(json.dumps(metrics, sort_keys=False))
    return 0
