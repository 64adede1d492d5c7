"""A recipe's `llm` / `tower` given by hub id train from the snapshot at `llm_revision` /
`tower_revision`, and `bunny merge lora` rebuilds the base from that same revision."""
from __future__ import annotations

import torch

from bunny.merge.lora import load_base
from bunny.model.loading import DEFAULT_TOWER
from bunny.testing import tiny_llm
from bunny.train.parts import build_for_recipe
from bunny.train.recipe import Recipe, load_recipe


def _publish_llm(hub_cache, tmp_path, seed: int, revision: str) -> str:
    llm, tokenizer = tiny_llm("llama", seed=seed)
    llm.save_pretrained(tmp_path / f"llm-{seed}")
    tokenizer.save_pretrained(tmp_path / f"llm-{seed}")
    return hub_cache.publish("someone/tiny-llm", tmp_path / f"llm-{seed}", revision=revision)


def _llm_state(model) -> dict:
    return {k: v.clone() for k, v in model.language_model.state_dict().items()}


def test_llm_revision_picks_the_snapshot_for_training_and_merging(tmp_path, hub_cache):
    _publish_llm(hub_cache, tmp_path, seed=1, revision="main")
    commit = _publish_llm(hub_cache, tmp_path, seed=2, revision="v2")
    hub_cache.publish("someone/tower", DEFAULT_TOWER)
    recipe = Recipe(llm="someone/tiny-llm", llm_revision=commit, tower="someone/tower", tower_revision="main")
    model, _ = build_for_recipe(recipe)
    on_main, _ = build_for_recipe(Recipe(llm="someone/tiny-llm", tower="someone/tower"))
    from_v2 = tiny_llm("llama", seed=2)[0].state_dict()
    for key, value in _llm_state(model).items():
        torch.testing.assert_close(value, from_v2[key], rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(_llm_state(model).values(), _llm_state(on_main).values()))

    # A run's recipe.yaml carries the revisions, so merging rebuilds the same base.
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(f"llm: someone/tiny-llm\nllm_revision: {commit}\ntower: someone/tower\n")
    recorded = load_recipe(run / "recipe.yaml")
    assert recorded.llm_revision == commit and recorded.tower_revision == ""
    base, _ = load_base(None, run, run, dtype=None)
    for key, value in _llm_state(base).items():
        torch.testing.assert_close(value, from_v2[key], rtol=0, atol=0)
