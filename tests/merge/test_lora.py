import copy
import json

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from bunny.errors import BunnyError
from bunny.merge.lora import merge_lora_adapter
from bunny.model.loading import load_pretrained
from bunny.testing import save_tiny_bunny
from bunny.train.parts import configure_trainables, save_adapter
from bunny.train.recipe import Recipe

R, ALPHA = 4, 8


def _train_like_stage2(base_dir, run_dir, seed=3):
    """A stage-2 output as `bunny train finetune` writes it: LoRA with non-zero B, a changed projector."""
    model, _ = load_pretrained(base_dir)
    configure_trainables(model, Recipe(stage="finetune", tune="lora", lora_r=R, lora_alpha=ALPHA, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # LoRA A/B (PEFT starts B at zero) and the projector
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    save_adapter(model, run_dir / "adapter")
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"stage": "finetune", "tune": "lora", "init_from": str(base_dir)}))
    return model


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = save_tiny_bunny(root / "base", seed=0)
    trained = _train_like_stage2(base, root / "run")
    return base, root / "run", trained


def _peft_reference(base_dir, adapter_dir):
    """What PEFT itself gives: get_peft_model + the saved adapter state + merge_and_unload."""
    model, _ = load_pretrained(base_dir)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    peft_model = get_peft_model(copy.deepcopy(model.language_model), config)
    result = set_peft_model_state_dict(peft_model, weights)  # PEFT's own key layout
    assert not result.unexpected_keys
    model.language_model = peft_model.merge_and_unload()
    model.mm_projector.load_state_dict({k.removeprefix("mm_projector."): v for k, v in
                                        load_file(str(adapter_dir / "non_lora_trainables.safetensors")).items()})
    return model


def test_merge_equals_peft_merge_and_unload(stage2, tmp_path):
    base, run, trained = stage2
    out = merge_lora_adapter(run / "adapter", tmp_path / "merged", base=str(base))
    merged, processor = load_pretrained(out)
    expected = _peft_reference(base, run / "adapter")
    ours, theirs = merged.state_dict(), expected.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    before = load_pretrained(base)[0].state_dict()
    assert not torch.equal(ours["language_model.model.layers.0.self_attn.q_proj.weight"],
                           before["language_model.model.layers.0.self_attn.q_proj.weight"])  # the fold did something
    # and the trained model's own outputs (LoRA still attached) are reproduced
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    assert merged.config.projector_trained


def test_base_found_from_the_runs_recipe(stage2, tmp_path):
    base, run, _ = stage2
    out = merge_lora_adapter(run, tmp_path / "merged")  # the run folder: adapter/ + recipe.yaml
    explicit = merge_lora_adapter(run / "adapter", tmp_path / "merged2", base=str(base))
    a, b = load_file(str(out / "model.safetensors")), load_file(str(explicit / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_for_another_base_is_refused(stage2, tmp_path):
    _, run, _ = stage2
    other = save_tiny_bunny(tmp_path / "other", family="phi3")  # fused qkv_proj: no q_proj
    with pytest.raises(BunnyError, match="was not trained on this base model") as err:
        merge_lora_adapter(run / "adapter", tmp_path / "x", base=str(other))
    assert "q_proj: no linear layer" in str(err.value)


def test_shape_mismatch_and_missing_base(stage2, tmp_path):
    from bunny.model.loading import save_pretrained
    from bunny.testing import tiny_image_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config
    from bunny.model.config import BunnyConfig
    from bunny.model.modeling import BunnyForConditionalGeneration
    from bunny.model.processor import BunnyProcessor

    _, run, _ = stage2
    tok = tiny_tokenizer()
    cfg = BunnyConfig(vision_config=tiny_vision_config("siglip"),
                      text_config=tiny_text_config("llama", len(tok), intermediate_size=80))
    model = BunnyForConditionalGeneration(cfg)
    other = save_pretrained(model, BunnyProcessor.from_config(cfg, tok, tiny_image_processor("siglip")), tmp_path / "b")
    with pytest.raises(BunnyError, match="do not fit a 32 -> 80 layer"):
        merge_lora_adapter(run / "adapter", tmp_path / "x", base=str(other))
    lone = tmp_path / "lone"
    lone.mkdir()
    for f in (run / "adapter").iterdir():
        (lone / f.name).write_bytes(f.read_bytes())
    with pytest.raises(BunnyError, match="pass --base"):
        merge_lora_adapter(lone, tmp_path / "x")
    with pytest.raises(BunnyError, match="not a LoRA adapter"):
        merge_lora_adapter(tmp_path / "b", tmp_path / "x")


def test_dora_refused(stage2, tmp_path):
    _, run, _ = stage2
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in (run / "adapter").iterdir():
        (dora / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dora / "adapter_config.json").read_text()) | {"use_dora": True}
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BunnyError, match="use_dora"):
        merge_lora_adapter(dora, tmp_path / "x", base="unused")


def test_training_conversion_and_merge_fold_alike(stage2, tmp_path):
    """The end of stage-2 training (train.parts.merge_lora), a reference LoRA folder
    (convert.lora.merge_lora) and `bunny merge lora` share one fold: the same LLM weights."""
    from peft.tuners.lora import LoraLayer

    from bunny.convert.lora import merge_lora as convert_merge
    from bunny.train.parts import merge_lora as train_merge

    base, run, trained = stage2
    merged, _ = load_pretrained(merge_lora_adapter(run / "adapter", tmp_path / "merged", base=str(base)))
    after_training = copy.deepcopy(trained)
    train_merge(after_training)
    assert not any(isinstance(m, LoraLayer) for m in after_training.modules())
    converted = convert_merge(load_pretrained(base)[0].language_model, run / "adapter")
    expected = merged.language_model.state_dict()
    for llm in (after_training.language_model, converted):
        state = llm.state_dict()
        assert set(state) == set(expected)
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(BunnyError, match="cannot read the LoRA adapter config .*bad/adapter_config.json"):
        convert_merge(converted, bad)
    (bad / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(BunnyError, match="has no lora_alpha"):
        convert_merge(converted, bad)
    (bad / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    save_file({"base_model.model.lm_head.weight": expected["lm_head.weight"]}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(BunnyError, match="holds no LoRA A/B weights"):
        convert_merge(converted, bad)


def test_run_built_from_llm_and_tower_merges_with_its_recipe_settings(tmp_path):
    """The base is rebuilt exactly as training built it: here with 2x2 image-token pooling,
    which a base composed from `llm` + `tower` alone would lack."""
    from transformers import SiglipVisionModel

    from bunny.testing import random_image, saved_lora_run, tiny_image_processor, tiny_llm, tiny_vision_config

    llm, tokenizer = tiny_llm("llama", seed=3)
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    torch.manual_seed(4)
    SiglipVisionModel(tiny_vision_config("siglip")).save_pretrained(tmp_path / "tower")
    tiny_image_processor("siglip").save_pretrained(tmp_path / "tower")
    recipe = dict(stage="finetune", tune="lora", llm=str(tmp_path / "llm"), tower=str(tmp_path / "tower"),
                  image_token_pool=2, lora_r=R, lora_alpha=ALPHA, lora_dropout=0.0)
    model, processor = saved_lora_run(recipe, tmp_path / "run")

    merged, merged_processor = load_pretrained(merge_lora_adapter(tmp_path / "run", tmp_path / "merged"))
    assert merged.config.image_token_pool == 2
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": "what?"}]}],
                                           add_generation_prompt=True)
    inputs = processor(text=prompt, images=[random_image(1)], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_adapter_files_are_readable_by_others_where_the_umask_allows(stage2):
    """The adapter folder a server or vLLM loads, possibly as another user: plain permissions
    (safetensors alone would write its two files 0600), and nothing left beside it."""
    import os

    _, run, _ = stage2
    mask = os.umask(0o022)
    os.umask(mask)
    adapter = run / "adapter"
    assert os.stat(adapter).st_mode & 0o777 == 0o777 & ~mask
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors", "adapter_config.json"):
        assert os.stat(adapter / name).st_mode & 0o777 == 0o666 & ~mask, name
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "recipe.yaml"]


def test_merge_into_a_file_is_refused(stage2, tmp_path):
    _, run, _ = stage2
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(BunnyError, match="afile is a file; an output folder cannot"):
        merge_lora_adapter(run / "adapter", tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "mine"
