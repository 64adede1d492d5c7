"""Does the demo's stage 1 teach the projector what is in the image, or only the caption's
wording? (docs/demo.md, "Stage 1 by the paper's method")

    python -m benchmarks.demo_stage1_probe [--lr 1e-3] [--epochs 2] [--every 25] [--word-init] [--norm-hold]

Runs the demo's stage 1 (`pretrain.yaml`: the projector alone on every training image's caption,
SmolLM2-135M-Instruct and the shipped tower frozen) on the demo's data (seed 0, 400 training
images) and, every `--every` steps, scores the captions of the 60 held-out images by teacher
forcing: the share of target tokens the frozen LLM predicts right, apart for colour words,
shape words and the rest. The rest ("a", "on the", "and") is the captions' wording, learnable
without looking at the image; colour and shape words need the image (chance: 1/6 and 1/4 if the
model knows which slot it is in). `--word-init` starts from the word-fit projector instead;
`--norm-hold` trains with `projector_norm_hold`. Each probe also reports the image tokens' mean
norm on the held-out images (SmolLM2's input embeddings: 3.2) and how word-like they are
(`demo_ground.word_alignment`: the shares of object tokens nearest their own colour word, shape
word and both; chance 1/6, 1/4, 1/24; the word-fit start ~0.97 both).
On 2 cores a stage-1 step takes ~3.5 s, each probe ~10 s.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def word_group_accuracy(targets: list[int], predicted: list[int], groups: dict[str, set[int]]) -> dict:
    """Per group of token ids (and "other" for the rest): [right, total] over aligned target and
    predicted tokens."""
    out = {name: [0, 0] for name in [*groups, "other"]}
    for t, p in zip(targets, predicted, strict=True):
        name = next((g for g, ids in groups.items() if t in ids), "other")
        out[name][0] += int(t == p)
        out[name][1] += 1
    return out


@torch.no_grad()
def probe(model, processor, dataset, groups: dict[str, set[int]], batch: int = 20) -> dict:
    """Teacher-forced caption loss and per-group next-token accuracy on `dataset`."""
    from bunny.data.collate import collate

    was_training = model.training
    model.eval()
    targets, predicted, losses = [], [], []
    for lo in range(0, len(dataset), batch):
        b = collate([dataset[i] for i in range(lo, min(lo + batch, len(dataset)))], processor.pad_token_id)
        # Full logits (no labels: the model would keep only trained positions); the dataset
        # already gives image tokens and prompts no label.
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits[:, :-1]
        labels = b["labels"][:, 1:]
        keep = labels != -100
        targets += labels[keep].tolist()
        predicted += logits[keep].argmax(-1).tolist()
        losses.append(F.cross_entropy(logits[keep].float(), labels[keep]).item())  # the model's loss
    if was_training:
        model.train()
        model.vision_tower.eval()
    hits = word_group_accuracy(targets, predicted, groups)
    return {"loss": round(sum(losses) / len(losses), 4),
            **{f"{name}_accuracy": round(r / max(1, n), 4) for name, (r, n) in hits.items()}}


def token_norm(model, dataset) -> float:
    """Mean norm of the projected image tokens of `dataset`'s images."""
    from bunny.train.parts import image_token_norm, projector_reference

    return image_token_norm(model, projector_reference(model, [dataset[i] for i in range(len(dataset))]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--word-init", action="store_true")
    ap.add_argument("--norm-hold", action="store_true", help="projector_norm_hold: the image tokens keep the "
                    "embeddings' norm after every step")
    ap.add_argument("--json", default="", help="append the probe rows to this JSON-lines file")
    args = ap.parse_args()

    import bunny.train.trainer as trainer
    from bunny.data.synthetic import COLOURS, SHAPES, caption, draw_example
    from bunny.data.synthetic_io import stage1_sample, synthesize
    from bunny.model.loading import DEFAULT_TOWER, build_model
    from bunny.train.demo import DEMO_CONFIGS
    from bunny.train.demo_ground import fit_word_projector, word_alignment, word_ids
    from bunny.train.recipe import load_recipe

    work = Path(tempfile.mkdtemp(prefix="bunny-stage1-probe-"))
    data = work / "data"
    synthesize(data, 400, 60, 0, max_turns=5, suffix="", train_hard_share=0.75)
    held_out = [stage1_sample(f"eval-{i}", f"images/eval/{i:06d}.png", caption(draw_example(0, "eval", i)[0]))
                for i in range(60)]
    (data / "stage1_eval.json").write_text(json.dumps(held_out))
    recipe = load_recipe(DEMO_CONFIGS / "pretrain.yaml",
                         {"seed": 0, "tower": DEFAULT_TOWER, "data_path": str(data / "stage1.json"),
                          "output_dir": str(work / "stage1"), "max_samples": 0, "lr": args.lr,
                          "epochs": args.epochs, "progress_bar": False, "tensorboard": False,
                          "projector_norm_hold": args.norm_hold}, stage="pretrain")
    recipe.resume = "none"
    torch.manual_seed(recipe.seed)  # the fresh projector's init: the same in every run
    model, processor = build_model(recipe.llm, tower=DEFAULT_TOWER, projector_type=recipe.projector_type,
                                   template="bunny-nosystem")
    if args.word_init:
        fit_word_projector(model, processor.tokenizer, seed=0)
        recipe.projector_norm_init = False
    eval_recipe = copy.copy(recipe)
    eval_recipe.data_path = str(data / "stage1_eval.json")
    held_out_set, _ = trainer.build_dataset(eval_recipe, processor)
    ids = word_ids(processor.tokenizer, COLOURS + SHAPES)
    groups = {"colour": {ids[c] for c in COLOURS}, "shape": {ids[s] for s in SHAPES}}
    rows = []

    def report(step: int, train_loss: float | None) -> None:
        row = {"step": step, "train_loss": train_loss, "lr": args.lr, "epochs": args.epochs,
               "word_init": args.word_init, "norm_hold": args.norm_hold,
               **probe(model, processor, held_out_set, groups),
               "token_norm": round(token_norm(model, held_out_set), 2),
               **{f"nearest_{k}_word": v for k, v in word_alignment(model, processor.tokenizer).items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)

    report(0, None)
    start = time.perf_counter()
    result = trainer.train(recipe, model, processor, on_step=lambda step, record: report(
        step, round(record["loss"], 4)) if step % args.every == 0 else None)
    if len(result.history) % args.every:
        report(len(result.history), round(result.history[-1]["loss"], 4))
    print(f"{len(result.history)} steps in {time.perf_counter() - start:.0f} s (probes included)")
    shutil.rmtree(work)
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
