"""Stage-2 training step at the demo's size: ours vs transformers' LlavaForConditionalGeneration
+ PEFT, with the same weights (SmolLM2-135M-Instruct + the 64x64 SigLIP-shaped tower +
mlp2x_gelu projector), the same LoRA (r 32 on every linear layer of the LLM), the same batch.

Each side runs in its own child process (so peak memory is its own), sides alternate for
`--rounds` rounds so machine load drifts hit both alike; medians are reported.

    python benchmarks/train_step.py [--batch 8] [--steps 3] [--rounds 2] [--tower PATH]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its select.py would shadow the
# standard library's `select` (which subprocess imports).
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def build_batch(tower: str, batch: int, data_dir: Path):
    from bunny.data.collate import collate
    from bunny.data.llava import ConversationDataset, load_conversations
    from bunny.data.synthetic_io import synthesize
    from bunny.model.loading import build_model

    if not (data_dir / "stage2.json").is_file():
        synthesize(data_dir, batch, 2, seed=0, max_turns=6, suffix="")
    model, processor = build_model("smollm2-135m", tower=tower)
    convs, _ = load_conversations(data_dir / "stage2.json")
    ds = ConversationDataset(convs[:batch], processor, "bunny", "pad")
    return model, processor, collate([ds[i] for i in range(batch)], processor.pad_token_id)


def to_llava(model):
    """The same weights as transformers' Llava (image token = an id inside the vocabulary)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = model.config
    image_token = 1  # Llava looks its placeholder up in the embeddings: use a real id
    config = LlavaConfig(vision_config=cfg.vision_config, text_config=cfg.text_config, image_token_id=image_token,
                         projector_hidden_act="gelu", vision_feature_layer=cfg.vision_feature_layer,
                         vision_feature_select_strategy="full", image_seq_length=cfg.image_seq_length,
                         multimodal_projector_bias=True)
    llava = LlavaForConditionalGeneration(config)
    state = {}
    for k, v in model.vision_tower.state_dict().items():
        state[f"model.vision_tower.{k}"] = v
    for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
        for p in ("weight", "bias"):
            state[f"model.multi_modal_projector.{theirs}.{p}"] = model.mm_projector.state_dict()[f"{ours}.{p}"]
    for k, v in model.language_model.model.state_dict().items():
        state[f"model.language_model.{k}"] = v
    state["lm_head.weight"] = model.language_model.lm_head.weight
    missing, unexpected = llava.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    llava.tie_weights()
    return llava.to(torch.float32), image_token


def child(side: str, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from bunny.train.parts import lora_targets

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _, batch = build_batch(args.tower, args.batch, Path(args.data))
    targets = lora_targets(model.language_model)
    if side == "llava":
        model, image_token = to_llava(model)
        batch = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["input_ids"] >= model.config.text_config.vocab_size,
                                                                     image_token))
        targets = [f"model.language_model.{t[len('model.'):]}" for t in targets]
    else:
        targets = [f"language_model.{t}" for t in targets]
    lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=targets)
    model = get_peft_model(model, lora)
    for n, p in model.named_parameters():  # the projector trains too, as in stage 2
        if "mm_projector" in n or "multi_modal_projector" in n:
            p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    device = "cuda" if args.device == "cuda" else "cpu"
    model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"side": side, "samples_per_s": args.batch / statistics.median(times), "step_s": times,
            "peak_mb": peak, "peak_growth_mb": (peak - base_rss / 1024) if device == "cpu" else None,
            "loss": float(loss), "tokens": int(batch["attention_mask"].sum())}


def main() -> None:
    from bunny.model.loading import DEFAULT_TOWER

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tower", default=DEFAULT_TOWER)
    ap.add_argument("--data", default="")
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return
    data = args.data or tempfile.mkdtemp(prefix="bunny-train-step-")
    results = {"ours": [], "llava": []}
    for _ in range(args.rounds):
        for side in ("ours", "llava"):
            cmd = [sys.executable, __file__, "--child", side, "--data", data] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "data")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[side].append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]))
    summary = {side: {"samples_per_s": statistics.median(r["samples_per_s"] for r in rs),
                      "peak_mb": max(r["peak_mb"] for r in rs), "loss": rs[0]["loss"], "tokens": rs[0]["tokens"]}
               for side, rs in results.items()}
    summary["ratio_ours_over_llava"] = summary["ours"]["samples_per_s"] / summary["llava"]["samples_per_s"]
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("child", "data")}
    print(json.dumps({"summary": summary, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
