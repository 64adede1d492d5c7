"""Where a demo stage-2 step spends its time on this CPU: torch's profiler over one training
step of the demo recipe (src/bunny/assets/configs/demo/finetune.yaml: SmolLM2-135M + the shipped tower, LoRA
on every linear layer, batch 8 of independent-turn samples with the demo's `max_turns` and
`train_hard_share` from src/bunny/assets/configs/demo/demo.yaml), after `--steps` timed steps.

    .venv/bin/python benchmarks/demo_step_profile.py [--steps 3] [--set lora_dropout=0.05 ...]

Any recipe field can be overridden with --set FIELD=VALUE (numbers parsed as YAML).
"""
from __future__ import annotations

import os
import sys

# benchmarks/select.py would shadow the standard library's `select` (imported by torch).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

from bunny.data.collate import collate  # noqa: E402
from bunny.data.synthetic_io import synthesize  # noqa: E402
from bunny.model.loading import DEFAULT_TOWER, build_model  # noqa: E402
from bunny.train.demo import DEMO_CONFIGS, load_settings  # noqa: E402
from bunny.train.parts import configure_trainables  # noqa: E402
from bunny.train.recipe import load_recipe  # noqa: E402
from bunny.train.trainer import build_dataset  # noqa: E402

CONFIG = DEMO_CONFIGS / "finetune.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--rows", type=int, default=20, help="profiler table rows")
    args = parser.parse_args()
    over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    work = Path(tempfile.mkdtemp(prefix="bunny_prof_"))
    demo, _, _ = load_settings(DEMO_CONFIGS, {})  # the demo's own data shape: the profile follows the shipped recipe
    synthesize(work, 8, 2, seed=0, max_turns=demo.max_turns, suffix="", train_hard_share=demo.train_hard_share)
    recipe = load_recipe(CONFIG, {"data_path": str(work / "stage2.json"), "output_dir": str(work / "out"),
                                  "tower": DEFAULT_TOWER, **over}, stage="finetune")
    model, processor = build_model(recipe.llm, tower=DEFAULT_TOWER, projector_type=recipe.projector_type,
                                   template=recipe.template)
    dataset, _ = build_dataset(recipe, processor)
    groups = configure_trainables(model, recipe)
    model.train()
    model.vision_tower.eval()
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups])
    batch = collate([dataset[i] for i in range(8)], processor.pad_token_id)

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    tokens = int(batch["attention_mask"].diagonal(dim1=-2, dim2=-1).sum()) if batch["attention_mask"].ndim == 4 \
        else int(batch["attention_mask"].sum())
    print(f"overrides {over or '{}'}: step seconds {[round(t, 2) for t in times]}, "
          f"{tokens} tokens a step, {tokens / min(times):.0f} tokens/s at best")
    from torch.profiler import profile

    with profile() as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
