"""Both stages on tiny models: what is frozen stays, what trains changes; resume repeats the
losses; a NaN stops with the last good checkpoint intact; exports load back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bunny.errors import BunnyError
from bunny.testing import make_tiny_bunny, random_image
from bunny.train.checkpoint import list_checkpoints
from bunny.train.parts import load_projector
from bunny.train.trainer import train

from trainhelp import tiny_recipe, write_captions, write_dataset

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture()
def data(tmp_path):
    return write_dataset(tmp_path / "data", n=8, text_only=2)


@pytest.fixture()
def captions(tmp_path):
    return write_captions(tmp_path / "caps", n=8)


def snapshot(model, prefix):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def changed(before, model):
    params = dict(model.named_parameters())
    return {n for n, v in before.items() if not torch.equal(v, params[n].detach())}


def test_stage1_trains_the_projector_only(tmp_path, captions):
    model, proc = make_tiny_bunny()
    tower, llm, proj = snapshot(model, "vision_tower"), snapshot(model, "language_model"), snapshot(model, "mm_projector")
    result = train(tiny_recipe(tmp_path, captions, stage="pretrain", tune="projector"), model, proc)
    assert not changed(tower, model) and not changed(llm, model)
    assert changed(proj, model) == set(proj)
    out = tmp_path / "run"
    assert (out / "mm_projector.bin").is_file() and (out / "mm_projector.safetensors").is_file()
    state = torch.load(out / "mm_projector.bin", weights_only=True)  # plain tensors, no pickled objects
    assert sorted(state) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                             "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    fresh, _ = make_tiny_bunny(seed=1)
    load_projector(fresh, out / "mm_projector.bin")
    torch.testing.assert_close(fresh.mm_projector.state_dict(), model.mm_projector.state_dict())
    assert (out / "loss_curve.png").is_file() and len(result.history) == 3


def test_stage2_lora_trains_adapters_and_projector_not_base(tmp_path, data):
    model, proc = make_tiny_bunny()
    tower, llm, proj = snapshot(model, "vision_tower"), snapshot(model, "language_model"), snapshot(model, "mm_projector")
    train(tiny_recipe(tmp_path, data, projector_lr=5e-3, max_steps=4), model, proc, stop_after=3)  # no export: adapters stay unmerged
    params = dict(model.named_parameters())
    lora = {n for n in params if "lora_" in n}
    assert lora and all(".lm_head." not in n for n in lora)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base_names = {n.replace(".base_layer", "") for n in params if n.startswith("language_model") and "lora_" not in n}
    assert base_names == set(llm)
    base_now = {n.replace(".base_layer", ""): p for n, p in params.items()
                if n.startswith("language_model") and "lora_" not in n}
    assert all(torch.equal(llm[n], base_now[n]) for n in llm)  # frozen base
    assert not changed(tower, model)
    assert changed(proj, model) == set(proj)
    lora_b = [p for n, p in params.items() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero; training moved every one


def test_stage2_unfrozen_tower_and_full_tuning(tmp_path, data):
    model, proc = make_tiny_bunny()
    tower, llm = snapshot(model, "vision_tower"), snapshot(model, "language_model")
    train(tiny_recipe(tmp_path, data, tune="full", unfreeze_tower=True, lr=1e-3, projector_lr=1e-3), model, proc)
    assert changed(tower, model)  # the tower trains (fully, not through no_grad)
    assert len(changed(llm, model)) > len(llm) // 2


def test_lora_export_merges_and_loads(tmp_path, data):
    from bunny.model.loading import load_pretrained

    model, proc = make_tiny_bunny()
    result = train(tiny_recipe(tmp_path, data, save_full_model=True), model, proc)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    loaded, _ = load_pretrained(result.outputs["model"])
    batch = proc(text=["USER: <image>\nWhat color? ASSISTANT:"], images=[random_image()])
    with torch.no_grad():
        a = result.model.eval()(**batch).logits
        b = loaded(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_resume_after_interruption_repeats_the_losses(tmp_path, data):
    kwargs = dict(max_steps=6, save_every=2, lora_dropout=0.1, per_device_batch_size=2, grad_accum=2)
    full = train(tiny_recipe(tmp_path / "a", data, **kwargs), *make_tiny_bunny())
    recipe = tiny_recipe(tmp_path / "b", data, **kwargs)
    train(recipe, *make_tiny_bunny(), stop_after=3)  # "killed" after step 3; last checkpoint at 2
    assert [p.name for p in list_checkpoints(recipe.output_dir)] == ["step-0000002"]
    model, proc = make_tiny_bunny()  # the same frozen base, as a pretrained LLM would be
    with torch.no_grad():  # trainables must come from the checkpoint, not from the fresh model
        for p in model.mm_projector.parameters():
            p.add_(torch.randn_like(p))
    resumed = train(recipe, model, proc)
    losses = [h["loss"] for h in resumed.history]
    assert len(losses) == 6
    torch.testing.assert_close(torch.tensor(losses), torch.tensor([h["loss"] for h in full.history]),
                               rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    model, proc = make_tiny_bunny()
    recipe = tiny_recipe(tmp_path, data, max_steps=6, save_every=2)
    calls = {"n": 0}
    original = type(model).forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(type(model), "forward", poisoned)
    with pytest.raises(BunnyError, match=r"loss became nan at step 3.*step-0000002"):
        train(recipe, model, proc)
    ckpts = list_checkpoints(recipe.output_dir)
    assert [p.name for p in ckpts] == ["step-0000002"]
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert state["step"] == 2 and all(h["loss"] == h["loss"] for h in state["history"])


def test_compiled_layers_give_the_same_losses(tmp_path, data):
    """`compile: true` compiles each decoder layer in place: same losses, same parameter
    names (aot_eager: traced and run through AOTAutograd without a C compiler)."""
    model_a, proc = make_tiny_bunny()
    plain = train(tiny_recipe(tmp_path / "a", data, max_steps=2), model_a, proc)
    model_b, proc = make_tiny_bunny()
    compiled = train(tiny_recipe(tmp_path / "b", data, max_steps=2, compile=True, compile_backend="aot_eager"),
                     model_b, proc)
    torch.testing.assert_close([h["loss"] for h in compiled.history], [h["loss"] for h in plain.history],
                               rtol=1e-4, atol=1e-5)
    assert [n for n, _ in model_b.named_parameters()] == [n for n, _ in model_a.named_parameters()]


def test_unknown_compile_backend_is_an_error(tmp_path, data):
    model, proc = make_tiny_bunny()
    with pytest.raises(BunnyError, match="unknown compile_backend 'nope'"):
        train(tiny_recipe(tmp_path, data, max_steps=1, compile=True, compile_backend="nope"), model, proc)


def test_deepspeed_without_a_gpu_is_an_error_not_a_silent_ddp_run(tmp_path, data):
    """Accelerate drops the DeepSpeed plugin when told cpu=True (as a CPU run must be): the
    recipe's `deepspeed` would be ignored without a word. It is an error instead."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: DeepSpeed is allowed")
    model, proc = make_tiny_bunny()
    with pytest.raises(BunnyError, match="no GPU is visible"):
        train(tiny_recipe(tmp_path, data, max_steps=1, deepspeed=str(CONFIGS / "deepspeed" / "zero2.json")), model, proc)
    with pytest.raises(BunnyError, match="DeepSpeed config not found"):
        train(tiny_recipe(tmp_path, data, max_steps=1, deepspeed=str(CONFIGS / "deepspeed" / "nope.json")), model, proc)


def test_on_step_sees_each_step_record_as_it_is_made(tmp_path, data):
    model, proc = make_tiny_bunny()
    seen = []
    result = train(tiny_recipe(tmp_path, data), model, proc,
                   on_step=lambda step, record: seen.append((step, dict(record), model.training)))
    assert [s for s, _, _ in seen] == [1, 2, 3]
    assert [r for _, r, _ in seen] == result.history  # the same records, in step order
    assert all(training for _, _, training in seen)  # called inside the loop, model still training
