"""benchmarks/train_step.py's GPU mode (`--gpu-shape`): the FLOP formulas, counted by hand and
by torch's FLOP counter, and the whole code path on the tiny shape on the CPU."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ts(load_benchmark):
    return load_benchmark("train_step")


def test_step_flops_counted_by_hand(ts):
    # A 2-layer LLM with hidden 4, 1 attention dim of 4, vocabulary 10; 6 tokens, 3 of them one
    # image's, the head on 2 labelled positions; LoRA r 2 on linears whose in + out sum to 30.
    f = ts.step_flops(seq=6, labelled=2, llm_layers=2, llm_linear=100, lora_rank=2, lora_fan=30,
                      attn_dim=4, hidden=4, vocab=10, image_tokens=3, projector=[(5, 4), (4, 4)],
                      tower_layers=1, tower_linear=50, tower_attn_dim=5, tower_tokens=3, patch_macs=7)
    assert f["tower_fwd"] == 2 * 7 + 2 * 50 * 3 + 4 * 5 * 3 * 3  # patches, linears, 3x3 pairs x 4 x 5
    assert f["projector_fwd"] == 2 * (20 + 16) * 3
    assert f["projector_bwd"] == (2 * (20 + 16) + 2 * 16) * 3  # weight grads both, input grads the 2nd only
    assert f["llm_linear_fwd"] == f["llm_linear_bwd"] == 2 * 100 * 6  # frozen: input grads only
    assert f["lora_fwd"] == 2 * 2 * 30 * 6 and f["lora_bwd"] == 2 * f["lora_fwd"]
    assert f["attention_fwd"] == 4 * 4 * 21 * 2  # causal: 1 + 2 + ... + 6 = 21 pairs, 2 layers
    assert f["attention_bwd"] == 2 * f["attention_fwd"]
    assert f["head_fwd"] == f["head_bwd"] == 2 * 4 * 10 * 2
    assert f["model"] == 494 + 216 + 312 + 1200 + 1200 + 720 + 1440 + 672 + 1344 + 160 + 160 == 7918
    assert f["recompute"] == 1200 + 720 + 672 and f["hardware"] == 7918 + 2592
    assert f["six_n"] == 6 * (100 + 4 * 10) * 6
    no_ckpt = ts.step_flops(**{**dict(seq=6, labelled=2, llm_layers=2, llm_linear=100, lora_rank=2, lora_fan=30,
                                      attn_dim=4, hidden=4, vocab=10, image_tokens=3, projector=[(5, 4), (4, 4)],
                                      tower_layers=1, tower_linear=50, tower_attn_dim=5, tower_tokens=3,
                                      patch_macs=7), "checkpointing": False})
    assert no_ckpt["hardware"] == no_ckpt["model"] == 7918


def test_peak_by_device_name(ts):
    assert ts.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert ts.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert ts.peak_bf16_flops("NVIDIA H200") == 989.4e12
    assert ts.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert ts.peak_bf16_flops("NVIDIA GeForce RTX 4090") is None


def _tiny_trainable(ts, checkpointing):
    from bunny.train.parts import configure_trainables
    from bunny.train.recipe import Recipe

    torch.manual_seed(0)
    model = ts.build_shaped_model("tiny", "cpu")
    shape = ts.flop_shape(model)
    configure_trainables(model, Recipe(stage="finetune", tune="lora", lora_r=8, lora_alpha=16))
    if checkpointing:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.vision_tower.eval()
    return model, shape


def test_flop_shape_of_tiny_model(ts):
    model, shape = _tiny_trainable(ts, False)
    # tiny Phi-3: hidden 32, 4 heads of 8, 2 KV heads, MLP 64 (gate and up fused), 2 layers.
    per_layer = 32 * (32 + 2 * 2 * 8) + 32 * 32 + 32 * 2 * 64 + 64 * 32
    assert shape["llm_linear"] == 2 * per_layer
    assert shape["lora_fan"] == 2 * ((32 + 64) + (32 + 32) + (32 + 128) + (64 + 32))
    assert (shape["attn_dim"], shape["hidden"], shape["vocab"], shape["llm_layers"]) == (32, 32, 256, 2)
    # tiny SigLIP: 28 px, patch 14 -> 4 tokens, hidden 24, MLP 48, 3 layers; projector 24 -> 32 -> 32.
    assert shape["image_tokens"] == shape["tower_tokens"] == 4
    assert shape["tower_linear"] == 3 * (4 * 24 * 24 + 2 * 24 * 48)
    assert shape["patch_macs"] == 3 * 14 * 14 * 24 * 4
    assert shape["projector"] == [(24, 32), (32, 32)]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_formula_matches_torch_flop_counter(ts, checkpointing):
    """torch's FlopCounterMode on one real step. The math SDPA kernel computes all seq^2 pairs
    (the formula counts the causal half) and the SigLIP pooling head runs but is not counted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model, shape = _tiny_trainable(ts, checkpointing)
    seq, labelled, batch = 16, 7, 2
    f = ts.step_flops(seq=seq, labelled=labelled, lora_rank=8, checkpointing=checkpointing, **shape)
    inputs = ts.make_shaped_batch(model.config, batch, seq, labelled, "cpu")
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
    a, layers = shape["attn_dim"], shape["llm_layers"]
    full_square = 4 * a * seq * seq * layers * (3 + int(checkpointing))  # fwd, 2x bwd, recompute
    causal = f["attention_fwd"] + f["attention_bwd"] + (f["attention_fwd"] if checkpointing else 0)
    d, mlp, tokens = 24, 48, 4  # the pooling head: one probe query over the 4 tokens
    pooling_head = 2 * d * d * (1 + 2 * tokens) + 2 * d * d + 2 * 2 * d * mlp + 4 * d * tokens
    expected = f["hardware"] - causal + full_square + pooling_head
    if checkpointing:  # the recompute stops early: each layer's last product, down_proj's LoRA B, is not redone
        expected -= 2 * 8 * 32 * seq * layers
    assert counter.get_total_flops() == batch * expected


def test_tiny_cpu_run_from_the_command_line(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--gpu-shape", "tiny", "--device", "cpu", "--batch", "2,3",
           "--seq", "32", "--steps", "2", "--warmup", "1", "--peak-tflops", "1", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["batch"] for r in lines] == [2, 3] and all(r["status"] == "ok" for r in lines)
    doc = json.loads(out.read_text())
    assert doc["configs"] == lines and doc["best"] in lines
    assert doc["model"]["image_tokens"] == 4 and doc["model"]["labelled_tokens"] == 28
    assert doc["model"]["params_trainable"] == doc["model"]["params_lora"] + doc["model"]["params_projector"]
    for r in lines:
        assert math.isfinite(r["loss"]) and r["steps_timed"] == 2
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 32 / r["step_s"])
        per_step = doc["flops_per_sample"]["model"] * r["batch"]
        assert r["mfu"] == pytest.approx(per_step / r["step_s"] / 1e12)
        assert r["hfu"] > r["mfu"] > 0


def test_budget_and_out_of_memory(ts, monkeypatch, capsys):
    base = ["--gpu-shape", "tiny", "--device", "cpu", "--seq", "16", "--steps", "1", "--warmup", "0"]
    doc = ts.gpu_main(base + ["--batch", "1,2", "--budget-s", "1e-6"])
    assert [r["status"] for r in doc["configs"]] == ["skipped", "skipped"] and doc["best"] is None

    real = ts.run_shaped_config

    def fake(model, groups, args, batch_size, *rest):
        if batch_size >= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, groups, args, batch_size, *rest)

    monkeypatch.setattr(ts, "run_shaped_config", fake)
    doc = ts.gpu_main(base + ["--batch", "1,2,4"])
    assert [r["status"] for r in doc["configs"]] == ["ok", "oom", "skipped"]
    assert doc["best"]["batch"] == 1 and doc["best"]["mfu"] is None  # no peak known on the CPU
    assert '"status": "oom"' in capsys.readouterr().out
