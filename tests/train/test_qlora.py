"""QLoRA (`quantize_base: 4bit|8bit`): what can be checked without a GPU (the errors, before
anything is built or written; the bitsandbytes settings; merging a QLoRA run into its
full-precision base), and a training run that runs only on a CUDA GPU with bitsandbytes."""
import importlib.util

import pytest
import torch

from bunny.errors import BunnyError
from bunny.merge.lora import merge_lora_adapter
from bunny.model.loading import load_pretrained
from bunny.testing import random_image, saved_lora_run, tiny_image_processor, tiny_llm, tiny_vision_config
from bunny.train import qlora
from bunny.train.recipe import Recipe
from bunny.train.trainer import train
from trainhelp import tiny_recipe, write_dataset

HAVE_GPU_QLORA = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """An LLM folder and a tower folder (tiny), as `llm:` and `tower:` of a recipe name them."""
    from transformers import SiglipVisionModel

    root = tmp_path_factory.mktemp("qlora")
    llm, tokenizer = tiny_llm("llama", seed=3)
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    torch.manual_seed(4)
    SiglipVisionModel(tiny_vision_config("siglip")).save_pretrained(root / "tower")
    tiny_image_processor("siglip").save_pretrained(root / "tower")
    return root


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_qlora_on_the_cpu_is_a_clear_error_before_anything_is_built(tmp_path):
    recipe = Recipe(quantize_base="4bit", data_path=str(tmp_path / "data.json"), output_dir=str(tmp_path / "run"))
    with pytest.raises(BunnyError) as err:
        train(recipe)  # would build the embedded SmolLM2 first if the check came later
    message = str(err.value)
    assert "quantize_base: 4bit cannot train here" in message and "no CUDA GPU is visible" in message
    assert "Remove quantize_base" in message
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "bitsandbytes is not installed (pip install bitsandbytes)" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fields, expected", [
    (dict(stage="finetune", tune="full"), "needs stage finetune and tune lora"),
    (dict(stage="pretrain", tune="projector"), "needs stage finetune and tune lora"),
    (dict(fsdp=True), "with fsdp is not supported"),
    (dict(deepspeed="configs/deepspeed/zero3.json"), "with deepspeed is not supported"),
])
def test_recipes_qlora_cannot_train(fields, expected, tmp_path):
    recipe = Recipe(quantize_base="8bit", output_dir=str(tmp_path / "run"), **fields)
    with pytest.raises(BunnyError, match=expected):
        train(recipe)
    assert not (tmp_path / "run").exists()


def test_qlora_from_a_whole_checkpoint_is_refused(tmp_path):
    from bunny.testing import save_tiny_bunny

    base = save_tiny_bunny(tmp_path / "base")
    with pytest.raises(BunnyError, match="is a whole bunny checkpoint"):
        qlora.check(Recipe(quantize_base="4bit", init_from=str(base), output_dir=str(tmp_path / "run")))


def test_unknown_quantize_base_lists_the_choices():
    with pytest.raises(BunnyError, match="quantize_base='3bit' is not valid; choose one of 4bit, 8bit"):
        Recipe(quantize_base="3bit")


def test_bitsandbytes_settings():
    four = qlora.bnb_config("4bit")
    assert (four.load_in_4bit, four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant,
            four.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)
    eight = qlora.bnb_config("8bit")
    assert eight.load_in_8bit and not eight.load_in_4bit


def test_a_qlora_run_merges_into_its_full_precision_base(parts, tmp_path):
    """`bunny merge lora` on a QLoRA run's output needs no GPU: the base is rebuilt in full
    precision from the run's recipe and the adapter folded into it, giving the logits of the
    full-precision base with the LoRA applied."""
    recipe = dict(stage="finetune", tune="lora", llm=str(parts / "llm"), tower=str(parts / "tower"),
                  quantize_base="4bit", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model, processor = saved_lora_run(recipe, tmp_path / "run")
    merged, _ = load_pretrained(merge_lora_adapter(tmp_path / "run", tmp_path / "merged"))
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": "what?"}]}],
                                           add_generation_prompt=True)
    inputs = processor(text=prompt, images=[random_image(1)], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAVE_GPU_QLORA, reason="QLoRA needs a CUDA GPU and bitsandbytes")
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_qlora_trains_on_a_gpu(parts, tmp_path, mode):
    import bitsandbytes as bnb

    data = write_dataset(tmp_path / "data", n=16)
    recipe = tiny_recipe(tmp_path, data, llm=str(parts / "llm"), tower=str(parts / "tower"), quantize_base=mode,
                         max_steps=10, per_device_batch_size=4, save_full_model=True, gradient_checkpointing=True)
    torch.cuda.reset_peak_memory_stats()
    result = train(recipe)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    kind = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    assert any(isinstance(m, kind) for m in result.model.language_model.modules())
    assert all(p.dtype == torch.float32 for p in result.model.mm_projector.parameters())
    merged, _ = load_pretrained(tmp_path / "run" / "model")  # folded into the full-precision base
    assert not any(isinstance(m, kind) for m in merged.modules())


@pytest.mark.skipif(not HAVE_GPU_QLORA, reason="QLoRA needs a CUDA GPU and bitsandbytes")
def test_qlora_peak_memory_against_lora_on_a_gpu(parts, tmp_path):
    """An LLM large enough for its weights to dominate (4 layers of width 1024, ~50M
    parameters): the 4-bit base keeps the GPU's peak well below LoRA on the float32 base
    under bf16 autocast (what `bf16: true` trains with)."""
    from transformers import AutoModelForCausalLM

    from bunny.testing import tiny_text_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = tiny_text_config("llama", len(tokenizer), bos_token_id=1, eos_token_id=2, hidden_size=1024,
                              intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    data = write_dataset(tmp_path / "data", n=8)
    peaks, losses = {}, {}
    for mode in ("4bit", ""):
        recipe = tiny_recipe(tmp_path / (mode or "lora"), data, llm=str(tmp_path / "llm"), tower=str(parts / "tower"),
                             quantize_base=mode, max_steps=5, per_device_batch_size=4, bf16="true", lr=1e-3)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result = train(recipe)
        peaks[mode] = torch.cuda.max_memory_allocated()
        losses[mode] = [h["loss"] for h in result.history]
        del result
    print(f"GPU peak: QLoRA 4bit {peaks['4bit'] / 2**20:.0f} MiB, LoRA {peaks[''] / 2**20:.0f} MiB; "
          f"losses {losses}")
    assert losses["4bit"][-1] < losses["4bit"][0]
    assert peaks["4bit"] < 0.5 * peaks[""]
