"""`bunny data synth`: the synthetic demo dataset. A thin face over
`bunny.data.synthetic_io.synthesize`."""
from __future__ import annotations

import json

from bunny.cli import get_group


def add_parsers(sub, groups) -> None:
    data = get_group(sub, groups, "data", help="Datasets: synthesis, mixtures, selection.")
    p = data.add_parser("synth", help="Generate the synthetic shapes dataset (images, "
                        "stage-1/2 LLaVA JSON, held-out eval JSONL).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, required=True, help="number of training images")
    p.add_argument("--eval", type=int, required=True, help="number of held-out images (even)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-turns", type=int, default=None,
                   help="cap QA turns per stage-2 sample (the yes/no pair comes first)")
    p.add_argument("--no-suffix", action="store_true",
                   help="do not append the short-answer instruction to questions")
    p.set_defaults(func=_synth)


def _synth(args) -> int:
    from bunny.data.synthetic_io import SHORT_ANSWER_SUFFIX, synthesize

    meta = synthesize(args.out, args.train, args.eval, args.seed, max_turns=args.max_turns,
                      suffix="" if args.no_suffix else SHORT_ANSWER_SUFFIX)
    print(json.dumps(meta, indent=1))
    return 0
