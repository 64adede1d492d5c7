"""Evaluation throughput: questions per second of `bunny eval run` at batch size 1 and 8.

The demo-sized model: the real SmolLM2-135M (embedded) with the shipped 64-token tower
(`src/bunny/assets/towers/shapes-siglip-64`; a tiny random SigLIP with 64 tokens per image
when that folder is not there yet) and a new projector. The benchmark: 48 synthetic
POPE-style questions (coloured shapes, yes/no) written as a local parquet file. Both batch
sizes run in the same process on the same model; their prediction files must be identical.

    .venv/bin/python benchmarks/eval_throughput.py [--questions 48] [--max-new-tokens N]
"""
from __future__ import annotations

import os
import sys

# benchmarks/select.py would shadow the standard library's `select` (imported by torch):
# drop this script's folder from the import path before anything else is imported.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bunny.eval.run import run_benchmark
from bunny.model.loading import DEFAULT_TOWER, build_model

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
CATEGORIES = ("random", "popular", "adversarial")


def shape_image(shape: str, colour: tuple, seed: int):
    from PIL import Image, ImageDraw

    w, h = 96 + (seed % 3) * 16, 80 + (seed % 4) * 8  # varied aspect ratios exercise `pad`
    img = Image.new("RGB", (w, h), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    x, y, r = 20 + seed % 30, 15 + seed % 20, 18
    if shape == "circle":
        draw.ellipse((x, y, x + 2 * r, y + 2 * r), fill=colour)
    elif shape == "square":
        draw.rectangle((x, y, x + 2 * r, y + 2 * r), fill=colour)
    else:
        draw.polygon([(x + r, y), (x, y + 2 * r), (x + 2 * r, y + 2 * r)], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def write_benchmark(folder: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(COLOURS)
    rows = []
    for i in range(n):
        shape, colour = SHAPES[i % 3], names[(i // 3) % 4]
        asked_shape = shape if i % 2 == 0 else SHAPES[(i + 1) % 3]
        rows.append(dict(question_id=f"q{i:03d}", image=shape_image(shape, COLOURS[colour], i),
                         category=CATEGORIES[i % 3],
                         question=f"Is there a {colour} {asked_shape} in the image?",
                         answer="yes" if asked_shape == shape else "no"))
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "test-00000-of-00001.parquet")
    return folder


def tower_folder(tmp: Path) -> tuple[str, str]:
    """The shipped tower if present, else a tiny random SigLIP with 64 tokens per image."""
    if (Path(DEFAULT_TOWER) / "config.json").is_file():
        return DEFAULT_TOWER, "shipped shapes-siglip-64"
    from transformers import SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from bunny.testing import tiny_vision_config

    folder = tmp / "tower"
    torch.manual_seed(0)
    SiglipVisionModel(tiny_vision_config("siglip", image_size=112, patch_size=14)).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 112, "width": 112}).save_pretrained(folder)
    return str(folder), "tiny random SigLIP, 112 px / patch 14 = 64 tokens (shipped tower absent)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the reference's 128")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on the shared 2-core machine a second thread "
                             "contends with other jobs and runs 4x slower)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bunny-eval-bench-"))
    data = write_benchmark(tmp / "pope", args.questions)
    tower, tower_note = tower_folder(tmp)
    torch.manual_seed(0)  # the new projector
    model, processor = build_model("smollm2-135m", tower=tower)
    model.eval()

    runs = {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        result = run_benchmark("pope", "smollm2-135m+" + Path(tower).name, data=str(data),
                               out=tmp / f"bs{bs}", batch_size=bs, max_new_tokens=args.max_new_tokens,
                               progress=False, loaded=(model, processor))
        text = (tmp / f"bs{bs}" / "pope.predictions.jsonl").read_text()
        lengths = [len(processor.tokenizer(json.loads(x)["prediction"]).input_ids) for x in text.splitlines()]
        runs[bs] = dict(seconds=result.seconds, qps=round(result.questions / result.seconds, 3),
                        predictions=text, mean_answer_tokens=round(sum(lengths) / len(lengths), 1),
                        f1_mean=result.metrics["f1_mean"])
        print(f"batch {bs}: {result.questions} questions in {result.seconds:.1f} s = "
              f"{runs[bs]['qps']:.2f} q/s", file=sys.stderr)

    sizes = sorted(runs)
    base = runs[sizes[0]]
    identical = all(runs[b]["predictions"] == base["predictions"] for b in sizes)
    summary = {
        "questions": args.questions, "max_new_tokens": args.max_new_tokens or 128,
        "tower": tower_note, "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "identical_predictions": identical,
        "runs": {b: {k: v for k, v in r.items() if k != "predictions"} for b, r in runs.items()},
        "speedup": {b: round(base["seconds"] / runs[b]["seconds"], 2) for b in sizes},
    }
    print(json.dumps(summary, indent=2))
    if not identical:
        print("FAIL: predictions differ between batch sizes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
