"""(Over 400 lines: the CPU comparison, the packing comparison and the GPU shape mode share
their model building and reporting.) Stage-2 training step at the demo's size: ours vs transformers' LlavaForConditionalGeneration
+ PEFT, with the same weights (SmolLM2-135M-Instruct + the 64x64 SigLIP-shaped tower +
mlp2x_gelu projector), the same LoRA (r 32 on every linear layer of the LLM), the same batch.

Each side runs in its own child process (so peak memory is its own), sides alternate for
`--rounds` rounds so machine load drifts hit both alike; medians are reported.

    python benchmarks/train_step.py [--batch 8] [--steps 3] [--rounds 2] [--tower PATH]

Packing mode (`--packing`, see `packing_main`): stage-2 training through `bunny.train.trainer.train`
on a LLaVA-like length mix (short answers and long conversations, one image of 64 tokens
each), padded vs `packing: true`, same model, data and sample order; tokens/s of real tokens:

    python benchmarks/train_step.py --packing [--batch 8] [--steps 3] [--rounds 2] [--samples 64]

GPU mode (`--gpu-shape`, see `gpu_main`): ours alone on a model of a given shape with random
weights (Bunny-4B: SigLIP-SO400M + Phi-3-mini, bf16, LoRA r 128, gradient checkpointing),
tokens/s, model FLOPs utilisation and peak memory per batch size:

    python -m benchmarks.train_step --gpu-shape bunny-4b --device cuda --batch 8,16 --seq 2048 \
        --steps 5 --warmup 2 --budget-s 120 --json train_step_gpu.json
    python -m benchmarks.train_step --gpu-shape tiny --device cpu --batch 2 --seq 32   # the same code, seconds
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
    if any(a == "--gpu-shape" or a.startswith("--gpu-shape=") for a in sys.argv[1:]):
        gpu_main(sys.argv[1:])
        return
    if "--packing" in sys.argv[1:]:
        packing_main([a for a in sys.argv[1:] if a != "--packing"])
        return
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


# -- packing mode: padded vs packed stage-2 training on a LLaVA-like length mix -----------------
#
# LLaVA-665k's instruction data mixes single questions with a word or phrase for an answer
# (VQA-style) and multi-turn conversations with sentence-long answers. The mix here: a share
# `--long-share` of conversations of 3-6 rounds (questions of 8-16 words, answers of 25-60),
# the rest one question of 8-14 words with an answer of 1-3 words; every sample has one image
# (64 tokens with the shipped tower). Words are drawn from a fixed list, seeded.

MIX_WORDS = ("the a red blue green yellow small large circle square triangle star left right top bottom "
             "image picture shows there is are two three four many near next to behind above below "
             "colour shape count position object background bright dark light round sharp corner edge "
             "centre middle side each every one some most all none which what where how why").split()


def mix_records(folder: Path, n: int, long_share: float, seed: int = 0) -> Path:
    """`n` samples of the length mix (images written beside them) -> the data file."""
    import random

    from bunny.testing import random_image

    rng = random.Random(f"packing-mix/{seed}")
    words = lambda lo, hi: " ".join(rng.choice(MIX_WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        random_image(seed=i, size=(64, 64)).save(folder / "images" / f"{i}.png")
        rounds = rng.randint(3, 6) if rng.random() < long_share else 0
        turns = [("<image>\n" + words(8, 16) + "?", words(25, 60) + ".")] if rounds else \
            [("<image>\n" + words(8, 14) + "?", words(1, 3))]
        turns += [(words(8, 16) + "?", words(25, 60) + ".") for _ in range(max(rounds - 1, 0))]
        records.append({"id": f"mix{i}", "image": f"images/{i}.png", "conversations": [
            {"from": side, "value": text} for q, a in turns for side, text in (("human", q), ("gpt", a))]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def packing_child(side: str, args) -> dict:
    """One side's run: `args.steps + 1` steps of `train` (the first untimed), then what the
    timed steps laid out: real tokens, and the token slots (rows x width) they filled."""
    from bunny.data.collate import collate
    from bunny.train.recipe import Recipe
    from bunny.train.trainer import build_dataset, sample_order, train

    out = Path(args.data) / f"run-{side}"
    recipe = Recipe(stage="finetune", tune="lora", llm="smollm2-135m", tower=args.tower, template="bunny",
                    data_path=str(Path(args.data) / "data.json"), output_dir=str(out), resume="none",
                    per_device_batch_size=args.batch, max_steps=args.steps + 2, lr=1e-4, lora_r=32,
                    lora_alpha=64, lora_dropout=0.0, warmup_ratio=0.0, model_max_length=args.max_length,
                    packing=side == "packed", num_threads=args.threads, seed=args.seed, tensorboard=False,
                    progress_bar=False, save_full_model=False)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = train(recipe, stop_after=args.steps + 1)  # stops before the export
    timed = result.history[1:]
    seconds = [args.batch / h["samples_per_s"] for h in timed]
    tokens = [h["tokens_per_s"] * t for h, t in zip(timed, seconds)]
    dataset, _ = build_dataset(recipe, result.processor)
    order = sample_order(recipe, dataset, 0)
    slots = 0
    for step in range(1, args.steps + 1):
        batch = collate([dataset[i] for i in order[step * args.batch:(step + 1) * args.batch]],
                        result.processor.pad_token_id,
                        **({"pack_to": args.max_length} if side == "packed" else {}))
        slots += batch["input_ids"].numel()
    return {"side": side, "tokens_per_s": sum(tokens) / sum(seconds), "step_s": seconds,
            "real_tokens": round(sum(tokens)), "token_slots": slots, "losses": [h["loss"] for h in result.history],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024}


def packing_main(argv: list[str]) -> dict:
    from bunny.model.loading import DEFAULT_TOWER

    ap = argparse.ArgumentParser(prog="python benchmarks/train_step.py --packing",
                                 description="Stage-2 tokens/s, padded vs packed, on a LLaVA-like length mix.")
    ap.add_argument("--batch", type=int, default=8, help="samples per step (per_device_batch_size)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one untimed)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side, alternating")
    ap.add_argument("--samples", type=int, default=64, help="samples in the mix")
    ap.add_argument("--long-share", type=float, default=0.4, help="share of long conversations")
    ap.add_argument("--max-length", type=int, default=2048, help="model_max_length (the packed rows' capacity)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tower", default=DEFAULT_TOWER)
    ap.add_argument("--data", default="")
    ap.add_argument("--child", default="")
    ap.add_argument("--json", default="", help="write the results here too")
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(packing_child(args.child, args)))
        return {}
    if args.samples < (args.steps + 2) * args.batch:
        raise SystemExit(f"--samples {args.samples} is fewer than {(args.steps + 2) * args.batch} "
                         "((steps + 2) x batch: the untimed step, the timed ones and one spare)")
    own_dir = not args.data
    data = Path(args.data or tempfile.mkdtemp(prefix="bunny-packing-"))
    try:
        mix_records(data, args.samples, args.long_share, args.seed)
        results: dict[str, list] = {"padded": [], "packed": []}
        for _ in range(args.rounds):
            for side in ("padded", "packed"):
                cmd = [sys.executable, __file__, "--packing", "--child", side, "--data", str(data)] + [
                    f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "data", "json")]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{side} run failed (exit status {done.returncode}; -9: killed, often for "
                                     f"memory):\n{done.stderr[-3000:]}")
                results[side].append(json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[7:]))
    finally:
        if own_dir:
            import shutil

            shutil.rmtree(data, ignore_errors=True)
    summary = {side: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "real_tokens": rs[0]["real_tokens"], "token_slots": rs[0]["token_slots"],
                      "fill": rs[0]["real_tokens"] / rs[0]["token_slots"],
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "losses": rs[0]["losses"]}
               for side, rs in results.items()}
    summary["ratio_packed_over_padded"] = summary["packed"]["tokens_per_s"] / summary["padded"]["tokens_per_s"]
    summary["ratio_per_round"] = [b["tokens_per_s"] / a["tokens_per_s"]
                                  for a, b in zip(results["padded"], results["packed"])]
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("child", "data")}
    doc = {"summary": summary, "runs": results}
    print(json.dumps(doc, indent=1))
    _write_json(args.json, doc)
    return doc


# -- GPU mode: ours alone, a model of a given shape with random weights -------------------------
#
# One stage-2 step as the trainer runs it (`bunny.train.parts.configure_trainables`: LoRA on
# every linear layer of the LLM but the head, projector trained, tower frozen; gradient
# checkpointing with use_reentrant=False; AdamW; gradient clipping at 1.0; bf16 autocast), on
# a model built by our own code (`BunnyForConditionalGeneration(BunnyConfig(...))`) from configs
# only, directly on the device in bf16. Every sample is one image plus text, exactly `--seq`
# tokens: the image's tokens first, then text; labels on the last `--label-tokens` text tokens
# (default: every text token, 2048 - 729 = 1319 for Bunny-4B, so the LM head runs on 1319
# positions: the most a sample of this length can train on; real stage-2 data labels only the
# answers). Tokens/s counts every position, image tokens included.

GPU_SHAPES = ("bunny-4b", "tiny")
# Dense (no sparsity) bf16 tensor-core peaks, NVIDIA datasheets (half the "with sparsity"
# figure). The first fragment found in torch.cuda.get_device_name() wins: variants first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989.4e12),  # SXM
    ("H200", 989.4e12),  # the H100 SXM's tensor cores with more, faster memory
    ("A100", 312e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    name = device_name.lower()
    return next((flops for fragment, flops in PEAK_BF16_FLOPS if fragment.lower() in name), None)


def step_flops(*, seq: int, labelled: int, llm_layers: int, llm_linear: int, lora_rank: int, lora_fan: int,
               attn_dim: int, hidden: int, vocab: int, image_tokens: int, projector: list[tuple[int, int]],
               tower_layers: int, tower_linear: int, tower_attn_dim: int, tower_tokens: int, patch_macs: int,
               checkpointing: bool = True) -> dict[str, int]:
    """FLOPs of one training sample: `seq` tokens of which `image_tokens` come from one image.

    Matrix products only, 2 FLOPs per multiply-add. Not counted: norms, activations, softmax,
    rotary embeddings, dropout, biases, the loss, the optimizer (all elementwise), and the
    SigLIP pooling head (one query; ~0.01% of a Bunny-4B step).

    Inputs: llm_linear = sum of in x out over the LLM's linear layers but the head, all
    layers; lora_fan = sum of in + out over the linears carrying LoRA of rank lora_rank;
    attn_dim = query heads x head dim; hidden x vocab = the LM head, run on the `labelled`
    positions only; projector = (in, out) of its linears, run on every image token;
    tower_linear = sum of in x out over the tower's encoder layers; patch_macs = the patch
    embedding's multiply-adds per image; tower_tokens = the tower's sequence per image.

    - Frozen base weights (LLM linears, LM head): backward computes input gradients only,
      one product the size of the forward: 2x per token each way, no weight gradients.
    - LoRA: forward 2 r (in + out) per token and adapted linear; backward twice that
      (input gradients and weight gradients).
    - Causal attention: query i attends to keys 0..i, seq (seq + 1) / 2 pairs per layer,
      4 attn_dim FLOPs per pair forward (Q K^T and P V), backward 2x forward. (PaLM and
      Megatron count all seq^2 pairs, twice this; a flash kernel skips the masked half.)
    - Projector: trained; its input (the frozen tower's output) needs no gradient, so the
      backward pass has weight gradients for every linear, input gradients for all but the
      first.
    - Tower: frozen, run without gradients: forward only, bidirectional attention.
    - `recompute`: gradient checkpointing runs each decoder layer's forward again in the
      backward pass. Part of `hardware` (HFU), not of `model` (MFU). (torch stops the
      recompute once the saved tensors are back, skipping each layer's last product,
      down_proj's LoRA B: 0.3% of the recompute at Bunny-4B's size, not subtracted.)
    - `six_n`: 6 x N x seq, N = the LLM's linear weights with the LM head (no input
      embeddings): the usual full-fine-tuning convention, for comparison with other reports.
      It counts weight gradients that LoRA never computes and leaves out attention and the tower.
    """
    pairs = seq * (seq + 1) // 2
    proj = sum(i * o for i, o in projector)
    proj_inputs = sum(i * o for i, o in projector[1:])
    flops = {
        "tower_fwd": 2 * patch_macs + 2 * tower_linear * tower_tokens + 4 * tower_attn_dim * tower_tokens ** 2 * tower_layers,
        "projector_fwd": 2 * proj * image_tokens,
        "projector_bwd": (2 * proj + 2 * proj_inputs) * image_tokens,
        "llm_linear_fwd": 2 * llm_linear * seq,
        "llm_linear_bwd": 2 * llm_linear * seq,
        "lora_fwd": 2 * lora_rank * lora_fan * seq,
        "lora_bwd": 4 * lora_rank * lora_fan * seq,
        "attention_fwd": 4 * attn_dim * pairs * llm_layers,
        "attention_bwd": 8 * attn_dim * pairs * llm_layers,
        "head_fwd": 2 * hidden * vocab * labelled,
        "head_bwd": 2 * hidden * vocab * labelled,
    }
    flops["model"] = sum(flops.values())
    flops["recompute"] = (flops["llm_linear_fwd"] + flops["lora_fwd"] + flops["attention_fwd"]) if checkpointing else 0
    flops["hardware"] = flops["model"] + flops["recompute"]
    flops["six_n"] = 6 * (llm_linear + hidden * vocab) * seq
    return flops


def shape_configs(shape: str, sliding_window: int = 0):
    """(vision_config, text_config) of a named shape; no download."""
    if shape == "bunny-4b":
        from transformers import Phi3Config

        from bunny.model.towers import preset_vision_config

        # SigLIP-SO400M/14 at 384 px: 1152 wide, 27 layers, 16 heads, MLP 4304, 729 tokens.
        vision = preset_vision_config("siglip-so400m-patch14-384")
        # Phi-3-mini: 3072 wide, 32 layers, 32 heads (no GQA), MLP 8192, vocabulary 32064.
        text = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    elif shape == "tiny":
        from bunny.testing import tiny_text_config, tiny_vision_config

        vision = tiny_vision_config("siglip")  # 28 px, patch 14: 4 tokens
        text = tiny_text_config("phi3", 256, bos_token_id=1, eos_token_id=2, max_position_embeddings=4096)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(GPU_SHAPES)}")
    # The released Phi-3-mini-4k sets sliding_window 2047: at exactly 2048 tokens that masks
    # one key of one query and makes transformers pass SDPA an explicit mask. Off by default.
    text.sliding_window = sliding_window or None
    return vision, text


def build_shaped_model(shape: str, device, sliding_window: int = 0):
    """Our model from configs, random weights, created on `device` in bf16 (4B parameters
    are never initialised on the CPU)."""
    import torch

    from bunny.model.config import BunnyConfig
    from bunny.model.modeling import BunnyForConditionalGeneration

    vision, text = shape_configs(shape, sliding_window)
    config = BunnyConfig(vision_config=vision, text_config=text, projector_type="mlp2x_gelu",
                         vision_tower=f"random {shape}", tokenizer_model_max_length=4096)
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = BunnyForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    for part in (model.language_model, model.vision_tower):
        if part.config._attn_implementation != "sdpa":
            raise RuntimeError(f"{type(part).__name__} uses {part.config._attn_implementation}, not sdpa")
    return model


def flop_shape(model) -> dict:
    """The sizes `step_flops` needs, counted from the model's modules (before LoRA)."""
    from torch import nn

    from bunny.model.config import TOWER_HAS_CLS
    from bunny.train.parts import lora_targets

    lm, cfg = model.language_model, model.config
    text, vision = cfg.text_config, cfg.vision_config
    linears = [lm.get_submodule(name) for name in lora_targets(lm)]
    head = lm.get_output_embeddings()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    tower_linears = [m for n, m in model.vision_tower.named_modules() if isinstance(m, nn.Linear) and "layers." in n]
    conv = next(m for m in model.vision_tower.modules() if isinstance(m, nn.Conv2d))
    grid = cfg.base_image_size // vision.patch_size
    return dict(
        llm_layers=text.num_hidden_layers,
        llm_linear=sum(m.in_features * m.out_features for m in linears),
        lora_fan=sum(m.in_features + m.out_features for m in linears),
        attn_dim=text.num_attention_heads * head_dim,
        hidden=head.in_features,
        vocab=head.out_features,
        image_tokens=cfg.image_seq_length,
        projector=[(m.in_features, m.out_features) for m in model.mm_projector.modules() if isinstance(m, nn.Linear)],
        tower_layers=vision.num_hidden_layers,
        tower_linear=sum(m.in_features * m.out_features for m in tower_linears),
        tower_attn_dim=vision.hidden_size,
        tower_tokens=grid * grid + int(TOWER_HAS_CLS[vision.model_type]),
        patch_macs=conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels * grid * grid,
    )


def make_shaped_batch(config, batch: int, seq: int, label_tokens: int, device, seed: int = 0) -> dict:
    """`batch` samples of exactly `seq` tokens: one image's tokens, then random text ids."""
    import torch

    image = config.image_seq_length
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.text_config.vocab_size, (batch, seq), generator=gen)
    ids[:, :image] = config.image_token_index
    labels = ids.clone()
    labels[:, :seq - label_tokens] = -100
    size = config.base_image_size
    pixels = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1  # SigLIP's normalised range
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device, torch.bfloat16),
            "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device), "use_cache": False}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_shaped_config(model, groups, args, batch_size: int, flops: dict, peak: float | None, t_start: float) -> dict:
    """Warm up, then time `args.steps` steps at one batch size; the record of one config."""
    import torch

    device = args.torch_device
    batch = make_shaped_batch(model.config, batch_size, args.seq, args.label_tokens, device, args.seed)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups],
                            fused=device.type == "cuda")
    params = [p for g in groups for p in g["params"]]
    times, cut = [], False
    t_config = time.perf_counter()
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            if args.budget_s and time.perf_counter() - t_start > args.budget_s and i < args.warmup + args.steps - 1:
                cut = True
                break
    step_s = sum(times) / len(times)
    per_step = {k: v * batch_size for k, v in flops.items()}
    record = {
        "batch": batch_size, "seq": args.seq, "status": "ok", "steps_timed": len(times), "budget_cut": cut,
        "step_s": step_s, "step_s_median": statistics.median(times), "step_s_all": times,
        "tokens_per_s": batch_size * args.seq / step_s, "samples_per_s": batch_size / step_s,
        "model_tflop_per_step": per_step["model"] / 1e12, "achieved_tflops": per_step["model"] / step_s / 1e12,
        "mfu": per_step["model"] / step_s / peak if peak else None,
        "hfu": per_step["hardware"] / step_s / peak if peak else None,
        "mfu_6n": per_step["six_n"] / step_s / peak if peak else None,
        "loss": float(loss.detach()), "config_wall_s": time.perf_counter() - t_config,
    }
    if device.type == "cuda":
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        record["peak_mem_gib"] = None
        record["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return record


def _write_json(path: str, doc: dict) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out)


def gpu_main(argv: list[str]) -> dict:
    """`--gpu-shape` mode: see the comment above `GPU_SHAPES`. Prints one JSON line per batch
    size, writes everything to `--json` (rewritten after each config, so a killed run keeps
    what it measured) and returns the same document."""
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_step --gpu-shape SHAPE",
                                 description="Stage-2 training throughput and MFU of a model shape with random weights.")
    ap.add_argument("--gpu-shape", required=True, choices=GPU_SHAPES)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: the tiny shape, for tests)")
    ap.add_argument("--batch", default="4,8", help="comma-separated batch sizes, each timed in turn")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sample, image tokens included")
    ap.add_argument("--label-tokens", type=int, default=0, help="labelled (trained) text tokens per sample; 0 = all text")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per batch size")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--lora-r", type=int, default=128)
    ap.add_argument("--lora-alpha", type=int, default=256)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--no-grad-ckpt", action="store_true", help="no gradient checkpointing (then HFU = MFU)")
    ap.add_argument("--trainable-dtype", default="bf16", choices=("bf16", "fp32"),
                    help="LoRA and projector weights: bf16 like the base, or fp32 master weights")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer of the LLM (regional)")
    ap.add_argument("--sliding-window", type=int, default=0, help="Phi-3's sliding_window (0 = none)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the card's dense bf16 peak; 0 = by device name")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop starting batch sizes (and cut timing short) past this many seconds; 0 = no limit")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="write all results here")
    args = ap.parse_args(argv)

    import gc
    import platform

    import peft
    import torch
    import transformers

    from bunny.train.parts import configure_trainables
    from bunny.train.recipe import Recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    args.torch_device = device
    batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_bf16_flops(device_name) if device.type == "cuda" else None)
    doc = {"benchmark": "train_step --gpu-shape", "settings": {k: v for k, v in vars(args).items() if k != "torch_device"},
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "peft": peft.__version__},
           "device": {"name": device_name, "peak_bf16_tflops": peak / 1e12 if peak else None,
                      "peak_source": "--peak-tflops" if args.peak_tflops else ("device name" if peak else None)},
           "configs": [], "best": None}

    # Build: our model from configs on the device, then exactly what the trainer does to it.
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = build_shaped_model(args.gpu_shape, device, args.sliding_window)
    shape = flop_shape(model)
    image_tokens, text_tokens = shape["image_tokens"], args.seq - shape["image_tokens"]
    if text_tokens < 1:
        raise SystemExit(f"--seq {args.seq} leaves no text after the image's {image_tokens} tokens")
    args.label_tokens = args.label_tokens or text_tokens
    if not 1 <= args.label_tokens <= text_tokens:
        raise SystemExit(f"--label-tokens must be 1..{text_tokens} (the text tokens), got {args.label_tokens}")
    recipe = Recipe(stage="finetune", tune="lora", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                    lora_dropout=args.lora_dropout, gradient_checkpointing=not args.no_grad_ckpt)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # LoRA weights are created where they live
            groups = configure_trainables(model, recipe)
    finally:
        torch.set_default_dtype(default)
    if args.trainable_dtype == "fp32":
        for g in groups:
            for p in g["params"]:
                p.data = p.data.float()
    if recipe.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.vision_tower.eval()
    if args.compile:  # the trainer's own `compile: true`
        from bunny.train.trainer import compile_layers

        compile_layers(model)
    _sync(device)
    doc["build_s"] = time.perf_counter() - t0
    flops = step_flops(seq=args.seq, labelled=args.label_tokens, lora_rank=args.lora_r,
                       checkpointing=recipe.gradient_checkpointing, **shape)
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    doc["model"] = {
        "shape": args.gpu_shape, "image_tokens": image_tokens, "text_tokens": text_tokens,
        "labelled_tokens": args.label_tokens, "attention": model.language_model.config._attn_implementation,
        "params": count(model.parameters()), "params_tower": count(model.vision_tower.parameters()),
        "params_projector": count(model.mm_projector.parameters()),
        "params_llm_base": count(p for n, p in model.language_model.named_parameters() if "lora_" not in n),
        "params_lora": count(p for n, p in model.language_model.named_parameters() if "lora_" in n),
        "params_trainable": count(p for p in model.parameters() if p.requires_grad),
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "flop_shape": shape,
    }
    doc["flops_per_sample"] = flops
    doc["flops_per_token"] = {k: v / args.seq for k, v in flops.items()}
    print(f"built {args.gpu_shape} on {device_name} in {doc['build_s']:.1f} s: {doc['model']['params'] / 1e9:.3f}B "
          f"parameters, {doc['model']['params_trainable'] / 1e6:.1f}M trainable; model {flops['model'] / 1e12:.3f} "
          f"TFLOP per sample ({flops['model'] / args.seq / 1e9:.2f} GFLOP/token); peak "
          f"{peak / 1e12 if peak else float('nan'):.1f} TFLOP/s", file=sys.stderr, flush=True)
    _write_json(args.json, doc)

    oom_at = None
    last = None  # (batch, wall seconds) of the last measured config, to predict the next
    for b in batches:
        elapsed = time.perf_counter() - t_start
        record = None
        if oom_at is not None and b >= oom_at:
            record = {"batch": b, "seq": args.seq, "status": "skipped", "reason": f"batch {oom_at} ran out of memory"}
        elif args.budget_s and (elapsed > args.budget_s or (last and elapsed + last[1] * b / last[0] > args.budget_s)):
            record = {"batch": b, "seq": args.seq, "status": "skipped",
                      "reason": f"budget: {elapsed:.0f} s used of {args.budget_s:.0f} s"}
        if record is None:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t_config = time.perf_counter()
            try:
                record = run_shaped_config(model, groups, args, b, flops, peak, t_start)
                last = (b, time.perf_counter() - t_config)
            except torch.cuda.OutOfMemoryError:
                record = {"batch": b, "seq": args.seq, "status": "oom"}
                oom_at = b if oom_at is None else min(oom_at, b)
            except Exception as exc:  # noqa: BLE001 - a one-shot run reports and goes on
                import traceback

                traceback.print_exc()
                record = {"batch": b, "seq": args.seq, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:1000]}
            model.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        doc["configs"].append(record)
        ok = [r for r in doc["configs"] if r["status"] == "ok"]
        doc["best"] = max(ok, key=lambda r: r["tokens_per_s"]) if ok else None
        doc["elapsed_s"] = time.perf_counter() - t_start
        print(json.dumps(record), flush=True)
        _write_json(args.json, doc)
    best = doc["best"]
    if best:
        mfu = f"MFU {best['mfu']:.1%}, HFU {best['hfu']:.1%}, 6N-MFU {best['mfu_6n']:.1%}" if peak else "MFU n/a (no peak)"
        print(f"best: batch {best['batch']}: {best['tokens_per_s']:.0f} tokens/s, {best['step_s']:.3f} s/step, {mfu}, "
              f"peak memory {best['peak_mem_gib'] or float('nan'):.1f} GiB; {doc['elapsed_s']:.0f} s in all",
              file=sys.stderr, flush=True)
    return doc


if __name__ == "__main__":
    main()
