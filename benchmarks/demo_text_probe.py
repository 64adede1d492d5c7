"""How fast does SmolLM2-135M-Instruct + LoRA learn the demo's yes/no task when the scene is
given as *text* instead of an image? (docs/demo.md, "What the image adds to the difficulty")

    python -m benchmarks.demo_text_probe [--steps 150] [--eval-every 25] [--train hard]

Each sample is one question in the demo's `bunny` template, the scene's caption in front:
"USER: Scene: a blue square on the left and a green cross on the right.\\nIs there a green
cross in the image? ASSISTANT: no". Same LoRA as the demo's stage 2 (r 32, alpha 64, dropout
0.05 on every linear layer but the head), lr 1e-3, batch 8, one question per sample. The
held-out questions are the demo's own 120 (60 eval images, balanced, half of the "no" hard);
accuracy compares the next-token logits of yes/Yes against no/No. The gap between this curve
and the image demo's says how much of the difficulty is reading the image tokens rather than
the yes/no rule itself. `--train hard`: training "no" questions mostly hard (80%).
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch


def examples(split: str, n: int, hard_train: bool = False) -> list[tuple[str, str, str, str]]:
    """(caption, question, answer, category) of the yes/no questions of n scenes."""
    from bunny.data.synthetic import caption, draw_example, easy_pairs, sample_scene, scene_rng, yes_no_qas

    out = []
    for i in range(n):
        if hard_train:
            rng = scene_rng(0, "text-probe-hard", i)
            scene = sample_scene(rng, need_hard=True)
            qas = yes_no_qas(scene, rng, "hard")
            if i % 4 == 0 and easy_pairs(scene):
                qas.append(yes_no_qas(scene, rng, "easy")[1])
        else:
            scene, qas = draw_example(0, split, i)
        out += [(caption(scene), q["question"], q["answer"], q["category"]) for q in qas if q["kind"] == "yes_no"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--train", default="demo", choices=("demo", "hard"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bunny.model.embedded import embedded_llm_path
    from bunny.model.templates import get_template

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = embedded_llm_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    template = get_template("bunny")

    def prompt(cap: str, q: str) -> str:
        return template.render([("user", f"Scene: {cap}.\n{q}"), ("assistant", None)])

    first = lambda words: sorted({tok(w, add_special_tokens=False).input_ids[0] for w in words})  # noqa: E731
    yes_ids, no_ids = first(["yes", " yes", "Yes", " Yes"]), first(["no", " no", "No", " No"])
    held_out = examples("eval", 60)

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        right: dict[str, list[int]] = {}
        for a in range(0, len(held_out), 32):
            batch = held_out[a:a + 32]
            enc = tok([prompt(c, q) for c, q, _, _ in batch], return_tensors="pt", padding=True, padding_side="left")
            logits = model(**enc).logits[:, -1]
            for (_, _, answer, category), row in zip(batch, logits):
                said = "yes" if row[yes_ids].max() > row[no_ids].max() else "no"
                right.setdefault(category, []).append(said == answer)
        model.train()
        per = {k: sum(v) / len(v) for k, v in right.items()}
        return {"accuracy": sum(sum(v) for v in right.values()) / len(held_out), **per}

    log = [{"step": 0, **evaluate()}]
    print(json.dumps(log[-1]), flush=True)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    train = examples("train", 2000, hard_train=args.train == "hard")
    random.Random(0).shuffle(train)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    start, tokens = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        batch = train[(step - 1) * 8 % len(train):][:8]
        prompts = [prompt(c, q) for c, q, _, _ in batch]
        enc = tok([p + " " + a + "<|endoftext|>" for p, (_, _, a, _) in zip(prompts, batch)],
                  return_tensors="pt", padding=True, padding_side="right")
        labels = torch.full_like(enc.input_ids, -100)
        for j, p in enumerate(prompts):  # train the answer and its end-of-text only
            n, m = len(tok(p).input_ids), int(enc.attention_mask[j].sum())
            labels[j, n:m] = enc.input_ids[j, n:m]
        tokens += int(enc.attention_mask.sum())
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % args.eval_every == 0:
            log.append({"step": step, "loss": round(loss.item(), 4), "train_tokens": tokens,
                        "seconds": round(time.perf_counter() - start, 1), **evaluate()})
            print(json.dumps(log[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"train": args.train, "log": log}, f, indent=1)


if __name__ == "__main__":
    main()
