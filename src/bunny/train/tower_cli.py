"""`bunny train tower`: pre-train the small vision tower on synthetic scenes, aligned with
an LLM's word embeddings (bunny.train.tower_pretrain). A thin face
over `bunny.train.tower_pretrain.train_tower`."""
from __future__ import annotations

import argparse
import json
import sys

from bunny.cli import get_group


def add_parsers(sub, groups) -> None:
    train = get_group(sub, groups, "train", help="Training: pre-training, fine-tuning.")
    p = train.add_parser("tower", help="Pre-train the tiny SigLIP tower on synthetic shapes.")
    p.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1400)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--llm", default=None, help="the LLM whose word embeddings the tower is aligned with "
                   "(default: smollm2-135m, the demo's)")
    p.add_argument("--word-weight", type=float, default=1.0,
                   help="weight of the word-embedding loss (0: the labels only, no LLM read)")
    p.set_defaults(func=_tower)


def _tower(args) -> int:
    from bunny.train.tower_pretrain import DEFAULT_LLM, DEFAULT_STEPS, train_tower

    report = train_tower(args.out, seed=args.seed, steps=args.steps or DEFAULT_STEPS,
                         batch_size=args.batch_size, lr=args.lr, num_threads=args.threads,
                         llm=args.llm or DEFAULT_LLM, word_weight=args.word_weight)
    print(json.dumps({k: v for k, v in report.items() if k != "losses"}, indent=1))
    return 0


if __name__ == "__main__":  # `python -m bunny.train.tower_cli train tower ...` works before
    # this module is listed in bunny.cli._GROUPS
    parser = argparse.ArgumentParser(prog="bunny")
    add_parsers(parser.add_subparsers(dest="command", required=True), {})
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed))
