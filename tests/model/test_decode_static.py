"""The static-cache decode path gives the plain path's greedy tokens (left-padded batches,
several LLM families, shared prefixes); the compiled step is checked once on a tiny model."""
import pytest
import torch

from bunny.errors import BunnyError
from bunny.model import decode_static
from bunny.model.decode_static import StaticDecoder, cache_length, check_compiler, compiled_shapes
from bunny.model.generation import SamplingSettings, generate, generate_ids, stream
from bunny.testing import make_tiny_bunny, random_image


def _ask(processor, text, n_images=1):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}])


def _batch(processor):
    """Prompts of different lengths (left padding), with and without images, one asked twice."""
    a, b = random_image(1), random_image(2)
    prompts = [
        (_ask(processor, "What colour is it?"), [a]),
        (_ask(processor, "Is there a red circle in the picture on the left?"), [a]),
        (_ask(processor, "How many?"), [b]),
        (processor.apply_chat_template([{"role": "user", "content": "Tell me about shapes"}]), []),
        (_ask(processor, "What colour is it?"), [a]),
    ]
    return processor(text=[p for p, _ in prompts], images=[i for _, i in prompts], padding_side="left")


def _static_plain(monkeypatch):
    """The static path with its step run eagerly (what compiling must reproduce), to test the
    cache handling on many models without paying a compile for each."""
    real = StaticDecoder.__init__

    def init(self, lm, batch, length, compile=True):
        real(self, lm, batch, length, compile=False)
    monkeypatch.setattr(StaticDecoder, "__init__", init)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "phi", "stablelm"])
def test_static_cache_matches_plain_path(family, monkeypatch):
    model, processor = make_tiny_bunny(family, "siglip", seed=3)
    inputs = _batch(processor)
    assert int((inputs["attention_mask"] == 0).sum()) > 0  # the batch is left-padded
    plain = generate_ids(model, inputs, SamplingSettings(max_new_tokens=12), [])
    _static_plain(monkeypatch)
    static = generate_ids(model, inputs, SamplingSettings(max_new_tokens=12, compile=True), [])
    assert static == plain
    # Each row alone equals its row in the batch.
    single = processor(text=[_ask(processor, "How many?")], images=[[random_image(2)]])
    assert generate_ids(model, single, SamplingSettings(max_new_tokens=12, compile=True), []) == [plain[2]]
    # Shared prefixes feed the same static decode.
    assert generate_ids(model, inputs, SamplingSettings(max_new_tokens=12, compile=True), [],
                        share_prefix=True) == plain
    # generate and stream take the same path.
    prompt, image = _ask(processor, "What colour is it?"), [random_image(1)]
    text = generate(model, processor, [prompt], [image], SamplingSettings(max_new_tokens=12))[0]
    settings = SamplingSettings(max_new_tokens=12, compile=True)
    assert generate(model, processor, [prompt], [image], settings)[0] == text
    assert "".join(stream(model, processor, prompt, image, settings)).strip() == text


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_static_logits_match_plain_logits(attention):
    """Not only the greedy picks: every step's logits agree up to float rounding (sdpa takes a
    boolean mask, eager an additive one)."""
    from bunny.model.generation import _plain_steps
    from bunny.model.modeling import positions_from_mask
    from transformers import DynamicCache

    model, processor = make_tiny_bunny("llama", "siglip", seed=5)
    inputs = _batch(processor)
    lm = model.language_model
    lm.config._attn_implementation = attention

    def prefill():
        mask = inputs["attention_mask"].long()
        out = lm(inputs_embeds=model.embed_inputs(inputs["input_ids"], inputs["pixel_values"]), attention_mask=mask,
                 position_ids=positions_from_mask(mask), cache=DynamicCache(config=lm.config), use_cache=True,
                 logits_to_keep=1)
        return out, mask

    with torch.inference_mode():
        out, mask = prefill()
        plain = _plain_steps(lm, out.cache, mask, 8)
        out2, mask2 = prefill()
        static = StaticDecoder(lm, mask.shape[0], cache_length(mask.shape[1] + 8), compile=False)
        static.load_prefill(out2.cache, mask2)
        token = out.logits[:, -1].argmax(-1)
        for _ in range(8):
            a, b = plain(token), static.step(token)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
            token = a.argmax(-1)


def test_compiled_step_matches_plain_path():
    """The one test that compiles: a left-padded batch of 2, greedy tokens equal; a second
    request of another prompt length reuses the compiled bucket (no recompile)."""
    model, processor = make_tiny_bunny("llama", "siglip", seed=7)
    prompts = [_ask(processor, "What colour is it?"), _ask(processor, "Is there a red circle in the picture?")]
    images = [[random_image(1)], [random_image(2)]]
    inputs = processor(text=prompts, images=images, padding_side="left")
    plain = generate_ids(model, inputs, SamplingSettings(max_new_tokens=10), [])
    compiled = generate_ids(model, inputs, SamplingSettings(max_new_tokens=10, compile=True), [])
    assert compiled == plain
    shapes = compiled_shapes(model.language_model)
    assert list(shapes) == [(2, cache_length(inputs["input_ids"].shape[1] + 10))] and shapes[(2, 256)] > 0
    # Another batch of two with other lengths: same bucket, runs under fail_on_recompile.
    other = processor(text=[_ask(processor, "How many?"), _ask(processor, "Where?")],
                      images=[[random_image(3)], [random_image(4)]], padding_side="left")
    assert (generate_ids(model, other, SamplingSettings(max_new_tokens=6, compile=True), [])
            == generate_ids(model, other, SamplingSettings(max_new_tokens=6), []))
    assert list(compiled_shapes(model.language_model)) == [(2, 256)]


def test_cache_length_buckets():
    assert cache_length(1) == 256 and cache_length(256) == 256 and cache_length(257) == 512
    assert cache_length(10, bucket=8) == 16
    with pytest.raises(BunnyError, match="at least one token"):
        cache_length(0)


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(BunnyError, match="C\\+\\+ compiler.*g\\+\\+.*without compiling"):
        check_compiler()
    model, processor = make_tiny_bunny("llama", "siglip", seed=1)
    inputs = processor(text=[_ask(processor, "How many?")], images=[[random_image(1)]])
    with pytest.raises(BunnyError, match="C\\+\\+ compiler"):
        generate_ids(model, inputs, SamplingSettings(max_new_tokens=4, compile=True), [])
    # The plain path needs none.
    assert len(generate_ids(model, inputs, SamplingSettings(max_new_tokens=4), [])[0]) <= 4


def test_compile_failure_is_a_clear_error(monkeypatch):
    model, processor = make_tiny_bunny("llama", "siglip", seed=2)

    def broken(*args):
        raise RuntimeError("inductor exploded")
    monkeypatch.setattr(decode_static, "_compiled_step", broken)
    inputs = processor(text=[_ask(processor, "How many?")], images=[[random_image(1)]])
    with pytest.raises(BunnyError, match="compiling the decode step .* failed: RuntimeError: inductor exploded"):
        generate_ids(model, inputs, SamplingSettings(max_new_tokens=4, compile=True), [])


def test_refusals():
    model, _ = make_tiny_bunny("llama", "siglip", seed=1)
    lm = model.language_model
    decoder = StaticDecoder(lm, 2, 8, compile=False)
    from transformers import DynamicCache
    with pytest.raises(BunnyError, match="3 rows x 4 tokens does not fit a static cache of 2 rows x 8"):
        decoder.load_prefill(DynamicCache(config=lm.config), torch.ones(3, 4))
    lm.config._attn_implementation = "flex_attention"
    with pytest.raises(BunnyError, match="supports sdpa and eager attention; this model uses 'flex_attention'"):
        StaticDecoder(lm, 1, 8, compile=False)
