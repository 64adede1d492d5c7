"""Tiny configs of several LLM families and towers through the one composition path."""
import pytest
import torch

from bunny.convert.llava_hf import to_llava_hf
from bunny.model.generation import SamplingSettings, generate, generate_ids, iter_tokens
from bunny.model.loading import load_pretrained, save_pretrained
from bunny.testing import make_tiny_bunny, random_image

FAMILIES = ["llama", "qwen2", "phi3"]
TOWERS = ["siglip", "clip"]
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]


def _inputs(processor, n_images=1, text=None):
    text = text or processor.apply_chat_template(QUESTION)
    return processor(text=[text], images=[random_image(i) for i in range(n_images)])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tower", TOWERS)
def test_forward_loss_generate(family, tower):
    model, processor = make_tiny_bunny(family, tower)
    inputs = _inputs(processor)
    out = model(**inputs)
    n_tokens = inputs["input_ids"].shape[1]
    assert out.logits.shape == (1, n_tokens, model.config.text_config.vocab_size)
    assert n_tokens > model.config.image_seq_length
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    loss = model(**inputs, labels=labels).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert model.mm_projector[0].weight.grad is not None
    answers = generate(model, processor, [processor.apply_chat_template(QUESTION)], [random_image(0)],
                       SamplingSettings(max_new_tokens=4))
    assert isinstance(answers[0], str)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tower", TOWERS)
def test_parity_with_transformers_llava(family, tower):
    model, processor = make_tiny_bunny(family, tower)
    llava = to_llava_hf(model)
    inputs = _inputs(processor)
    ours = model(**inputs).logits
    theirs = llava(**inputs).logits[..., : ours.shape[-1]]
    torch.testing.assert_close(ours, theirs)


def test_save_load_round_trip(tmp_path):
    model, processor = make_tiny_bunny("qwen2", "siglip")
    save_pretrained(model, processor, tmp_path / "ckpt")
    loaded, loaded_processor = load_pretrained(tmp_path / "ckpt")
    inputs = _inputs(processor)
    assert torch.equal(loaded_processor(text=[processor.apply_chat_template(QUESTION)],
                                        images=[random_image(0)])["input_ids"], inputs["input_ids"])
    assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert loaded.config.template == "bunny" and loaded_processor.template == "bunny"


def test_kv_cache_generation_equals_recomputation():
    model, processor = make_tiny_bunny("llama", "siglip", seed=3)
    inputs = _inputs(processor)
    cached = [int(t) for t in iter_tokens(model, inputs["input_ids"], inputs["attention_mask"],
                                          inputs["pixel_values"], SamplingSettings(max_new_tokens=8), [])]
    ids = inputs["input_ids"]
    recomputed = []
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"],
                           attention_mask=torch.ones_like(ids)).logits
            token = int(logits[0, -1].argmax())
            recomputed.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert cached == recomputed


def test_transformers_generate_matches_our_loop():
    model, processor = make_tiny_bunny("phi3", "clip", seed=1)
    inputs = _inputs(processor)
    ours = generate_ids(model, inputs, SamplingSettings(max_new_tokens=6), eos_token_ids=[])[0]
    theirs = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert theirs[0, inputs["input_ids"].shape[1]:].tolist() == ours


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_one_at_a_time(family):
    model, processor = make_tiny_bunny(family, "siglip", seed=2)
    prompts = [
        processor.apply_chat_template(QUESTION),
        processor.apply_chat_template([{"role": "user", "content": "Tell me a long story about shapes please"}]),
        processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]),
    ]
    images = [[random_image(1)], [], [random_image(2), random_image(3)]]
    settings = SamplingSettings(max_new_tokens=6)
    batched = generate_ids(model, processor(text=prompts, images=images, padding_side="left"), settings, [])
    single = [generate_ids(model, processor(text=[p], images=i), settings, [])[0] for p, i in zip(prompts, images)]
    assert batched == single


def test_right_padding_forward_matches_single():
    model, processor = make_tiny_bunny("llama", "siglip")
    prompts = [processor.apply_chat_template(QUESTION), "USER: short ASSISTANT:"]
    images = [[random_image(0)], []]
    batch = processor(text=prompts, images=images, padding_side="right")
    logits = model(**batch).logits
    for i, (p, im) in enumerate(zip(prompts, images)):
        alone = processor(text=[p], images=im)
        n = alone["input_ids"].shape[1]
        torch.testing.assert_close(logits[i, :n], model(**alone).logits[0], atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded():
    model, processor = make_tiny_bunny("llama", "siglip")
    prompt = [processor.apply_chat_template(QUESTION)]
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a = generate(model, processor, prompt, [random_image(0)], settings)
    b = generate(model, processor, prompt, [random_image(0)], settings)
    assert a == b
