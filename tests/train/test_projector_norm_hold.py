"""projector_norm_hold: after every optimizer step the projected image tokens have the LLM's
embedding norm again; resuming repeats the run; sharded runs refuse it."""
from __future__ import annotations

import pytest
import torch

from bunny.errors import BunnyError
from bunny.testing import make_tiny_bunny
from bunny.train.trainer import build_dataset, train

from trainhelp import tiny_recipe, write_captions, write_dataset


@pytest.fixture()
def data(tmp_path):
    return write_dataset(tmp_path / "data", n=8)


@pytest.fixture()
def captions(tmp_path):
    return write_captions(tmp_path / "caps", n=8)


def mean_norms(model, recipe, processor) -> tuple[float, float]:
    """(image tokens' mean norm on the samples the hold measures, the embeddings' mean norm)."""
    dataset, _ = build_dataset(recipe, processor)
    pixels = torch.cat([dataset[i]["pixel_values"] for i in range(min(len(dataset), 16))])
    with torch.no_grad():
        tokens = model.get_image_features(pixels).norm(dim=-1).mean()
    return float(tokens), float(model.get_input_embeddings().weight.norm(dim=-1).mean())


@pytest.mark.parametrize("stage, tune, unfreeze_tower", [("pretrain", "projector", False), ("finetune", "lora", False),
                                                         ("finetune", "lora", True)])  # a training tower: measured anew
def test_every_step_ends_at_the_embedding_norm(tmp_path, data, captions, stage, tune, unfreeze_tower):
    data = captions if stage == "pretrain" else data
    model, proc = make_tiny_bunny()
    recipe = tiny_recipe(tmp_path, data, stage=stage, tune=tune, max_steps=4, lr=5e-2, projector_norm_hold=True,
                         unfreeze_tower=unfreeze_tower)
    seen = []

    def check(step, record):  # called after the step's update and the hold
        tokens, embeddings = mean_norms(model, recipe, proc)
        seen.append((record["projector_scale"], tokens, embeddings))

    train(recipe, model, proc, on_step=check)
    assert len(seen) == 4
    for scale, tokens, embeddings in seen:
        assert tokens == pytest.approx(embeddings, rel=1e-4)
        assert scale != 1.0  # the step had moved the norm; the hold moved it back

    # Without the hold the same run drifts away from the embeddings' norm.
    model, proc = make_tiny_bunny()
    plain = tiny_recipe(tmp_path / "plain", data, stage=stage, tune=tune, max_steps=4, lr=5e-2,
                        projector_norm_init=True, unfreeze_tower=unfreeze_tower)
    train(plain, model, proc)
    tokens, embeddings = mean_norms(model, plain, proc)
    assert abs(tokens / embeddings - 1) > 1e-2


def test_resume_repeats_the_held_run(tmp_path, captions):
    kwargs = dict(stage="pretrain", tune="projector", max_steps=6, save_every=2, lr=5e-2, projector_norm_hold=True)
    full = train(tiny_recipe(tmp_path / "a", captions, **kwargs), *make_tiny_bunny())
    recipe = tiny_recipe(tmp_path / "b", captions, **kwargs)
    train(recipe, *make_tiny_bunny(), stop_after=3)  # "killed" after step 3; last checkpoint at 2
    resumed = train(recipe, *make_tiny_bunny())
    for key in ("loss", "projector_scale"):
        torch.testing.assert_close(torch.tensor([h[key] for h in resumed.history]),
                                   torch.tensor([h[key] for h in full.history]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sharding", [{"fsdp": True}, {"deepspeed": "configs/deepspeed/zero2.json"}])
def test_sharded_runs_refuse_the_hold(tmp_path, data, sharding):
    with pytest.raises(BunnyError, match="projector_norm_hold .* sharded"):
        tiny_recipe(tmp_path, data, projector_norm_hold=True, **sharding)
