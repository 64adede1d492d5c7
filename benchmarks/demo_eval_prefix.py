"""The demo's held-out evaluation with and without shared prefixes, on one trained model.

Each held-out image gets ~6 questions; with `share_prefix` the image and the prompt start
before the question run once per image instead of once per question. Both ways run in the
same process on the same model and records, alternating for `--rounds` rounds; the script
prints the median seconds of each, the ratio and how many predictions differ (they should
not: the two prefills agree up to float rounding).

    .venv/bin/python benchmarks/demo_eval_prefix.py --model outputs/demo/stage2/model \
        --data outputs/demo/data [--rounds 2] [--batch 32]
"""
from __future__ import annotations

import os
import sys

# benchmarks/select.py would shadow the standard library's `select` (imported by torch).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bunny.model.generation import SamplingSettings, generate  # noqa: E402
from bunny.model.loading import load_pretrained  # noqa: E402
from bunny.train.demo_eval import predict, prompt_for, read_eval_records  # noqa: E402


def plain_predict(model, processor, records, root: Path, batch: int) -> list[str]:
    """The evaluation as before: consecutive records in batches, every prompt prefilled whole."""
    out = []
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        out += generate(model, processor, [prompt_for(processor, r["prompt"]) for r in chunk],
                        [str(root / r["image"]) for r in chunk], SamplingSettings(max_new_tokens=4))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained demo model (outputs/demo/stage2/model)")
    parser.add_argument("--data", required=True, help="the demo's data folder (holds eval.jsonl)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    model, processor = load_pretrained(args.model)
    root = Path(args.data)
    records = read_eval_records(root / "eval.jsonl")
    times = {"plain": [], "shared": []}
    answers = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name in ("plain", "shared"):
                t = time.perf_counter()
                if name == "plain":
                    answers[name] = plain_predict(model, processor, records, root, args.batch)
                else:
                    answers[name] = [r["prediction"] for r in predict(model, processor, records, root, args.batch)]
                times[name].append(time.perf_counter() - t)
    plain, shared = statistics.median(times["plain"]), statistics.median(times["shared"])
    differ = sum(a != b for a, b in zip(answers["plain"], answers["shared"]))
    result = {"questions": len(records), "images": len({r["image"] for r in records}), "batch": args.batch,
              "plain_seconds": round(plain, 2), "shared_seconds": round(shared, 2),
              "speedup": round(plain / shared, 2), "predictions_differing": differ,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads"}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
