"""Quantised loading: int8 dynamic linear layers on the CPU; bitsandbytes modes fail clearly here."""
import pytest
import torch

from bunny.errors import BunnyError
from bunny.model.generation import SamplingSettings, generate
from bunny.serve.quantize import quantize_model
from bunny.testing import make_tiny_bunny, random_image


def test_int8_quantises_llm_linears_and_keeps_outputs_close():
    model, processor = make_tiny_bunny(seed=6)
    reference, _ = make_tiny_bunny(seed=6)
    quantize_model(model, "int8")
    linears = [m for m in model.language_model.modules() if type(m) is torch.nn.Linear]
    assert linears == [model.language_model.get_output_embeddings()]  # all but the (tied) head replaced
    assert any(type(m) is torch.nn.Linear for m in model.mm_projector.modules())  # projector untouched
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                           "text": "What?"}]}])
    inputs = processor(text=[prompt], images=[random_image(0)])
    with torch.inference_mode():
        a = reference(**inputs).logits
        b = model(**inputs).logits
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    assert generate(model, processor, [prompt], [[random_image(0)]], SamplingSettings(max_new_tokens=3))


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_bitsandbytes_modes_need_a_gpu(mode):
    model, _ = make_tiny_bunny()
    with pytest.raises(BunnyError, match="needs a CUDA GPU|needs bitsandbytes"):
        quantize_model(model, mode, "cpu")


def test_unknown_mode_and_int8_on_gpu_are_refused():
    model, _ = make_tiny_bunny()
    with pytest.raises(BunnyError, match="unknown quantisation"):
        quantize_model(model, "int4")
    with pytest.raises(BunnyError, match="CPU only"):
        quantize_model(model, "int8", "cuda")
