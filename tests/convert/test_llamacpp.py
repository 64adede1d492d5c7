"""The GGUF export inside llama.cpp (llama-cpp-python): every supported LLM family loads and
gives transformers' logits, the tokenizer splits text as bunny's does, the embedded chat
template renders bunny's prompts, and the mmproj gives bunny's projected image features."""
import numpy as np
import pytest
import torch
import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from bunny.convert.export_gguf import check_q8_0, export_gguf
from bunny.convert.gguf_tokenizer import CHECK_TEXT
from bunny.errors import BunnyError
from bunny.model.loading import load_pretrained
from bunny.testing import random_image, save_tiny_bunny
from tests.convert.llamacpp_helpers import image_embeddings, load_llm, text_logits

TEXTS = ["A chat between a curious user and an artificial intelligence assistant. USER: What is 123 + 4567?",
         "  leading spaces\n\ttabs and <|endoftext|> a special token </s> I've, we'RE 3.14159",
         CHECK_TEXT]


def _export(tmp_path, outtype="f32", **kwargs):
    src = save_tiny_bunny(tmp_path / "m", seed=3, **kwargs)
    llm, mmproj = export_gguf(src, tmp_path / "gguf", outtype=outtype)
    model, processor = load_pretrained(src)
    return model, processor, llm, mmproj


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "phi", "stablelm"])
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_every_family_gives_transformers_logits_in_llamacpp(tmp_path, family, outtype):
    model, processor, path, _ = _export(tmp_path, outtype, family=family)
    llm = load_llm(path, kv=outtype)
    ids = processor.tokenizer(TEXTS[0] + " " + TEXTS[1]).input_ids
    got = text_logits(llm, ids)
    lm = model.language_model
    if outtype == "f16":  # the reference holds the same f16-rounded weights
        lm = lm.half().float()
    with torch.no_grad():
        want = lm(torch.tensor([ids])).logits[0].numpy()
    assert got.shape == want.shape
    scale = np.abs(want).max()
    # f32: both compute in float32, except that llama.cpp's CPU GELU (phi) reads a table of
    # f16 values; f16: llama.cpp also rounds activations and the KV cache to f16.
    tol = 5e-3 if outtype == "f16" else 5e-4 if family == "phi" else 1e-5
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("bos", [False, True])
def test_llamacpp_tokenizes_as_bunny(tmp_path, bos):
    _, processor, path, _ = _export(tmp_path, bos=bos)
    llm = load_llm(path, vocab_only=True)
    for text in TEXTS:
        want = processor.tokenizer(text).input_ids
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == want, text
        assert llm.detokenize(want, special=True).decode() == processor.tokenizer.decode(want), text


def test_llamacpp_stops_where_bunny_stops(tmp_path):
    _, processor, path, _ = _export(tmp_path)
    llm = load_llm(path, vocab_only=True)
    tok = processor.tokenizer
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llm.token_eos() == tok.eos_token_id
    assert processor.stop_token_ids() == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")})
    for stop in processor.stop_token_ids():  # EOS and the template's end of answer
        assert llama_cpp.llama_vocab_is_eog(vocab, stop)
    assert not llama_cpp.llama_vocab_is_eog(vocab, tok.convert_tokens_to_ids("USER"))


@pytest.mark.parametrize("template", ["bunny", "bunny-nosystem", "llama", "plain"])
def test_embedded_chat_template_renders_bunnys_prompt_in_llamacpp(tmp_path, template):
    _, processor, path, _ = _export(tmp_path, template=template)
    llm = load_llm(path, vocab_only=True)
    jinja = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template=jinja, eos_token="</s>", bos_token="<s>")
    image_q = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    conversations = [image_q, [{"role": "user", "content": "<image>\nHow many stars?"}]]
    if template != "plain":
        conversations += [
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            image_q + [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Colour?"}],
        ]
    for messages in conversations:
        want = processor.apply_chat_template(messages, template=template)
        assert formatter(messages=messages).prompt == want


@pytest.mark.parametrize("feature_layer", [-3, -2, -1])
def test_mmproj_gives_bunnys_image_features_in_llamacpp(tmp_path, feature_layer):
    """Exactly the tower blocks bunny runs: one block more or less is far off."""
    model, processor, path, mmproj = _export(tmp_path, vision_feature_layer=feature_layer)
    llm = load_llm(path, logits_all=False)
    image = random_image(5, (28, 28))  # the tower's size: no resize on either side
    got = image_embeddings(llm, mmproj, np.asarray(image))
    with torch.no_grad():
        pixels = processor(text=["<image>"], images=[image])["pixel_values"]
        want = model.get_image_features(pixels)[0].numpy()
    assert got.shape == want.shape
    # llama.cpp computes the projector's GELU (exact erf in bunny) with its tanh approximation.
    tol = 2e-3 * np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    model.config.vision_feature_layer = feature_layer - 1  # one block fewer: not within tolerance
    with torch.no_grad():
        assert np.abs(model.get_image_features(pixels)[0].numpy() - got).max() > 10 * tol


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_q8_0_export_runs_in_llamacpp_near_the_float_logits(tmp_path, family):
    from gguf import GGMLQuantizationType, GGUFReader

    model, processor, path, mmproj = _export(tmp_path, "q8_0", family=family)
    assert path.name == "model-q8_0.gguf" and mmproj.name == "mmproj-model-q8_0.gguf"
    types = {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert {t.tensor_type for t in GGUFReader(str(mmproj)).tensors} == {GGMLQuantizationType.F32}
    llm = load_llm(path)
    ids = processor.tokenizer(TEXTS[0] + " " + TEXTS[1]).input_ids
    got = text_logits(llm, ids)
    with torch.no_grad():
        want = model.language_model(torch.tensor([ids])).logits[0].numpy()
    # 8-bit weights in blocks of 32 (llama.cpp also rounds the activations to 8 bits for its products):
    # near the float logits, far from f32's 1e-5, and the same next token almost everywhere.
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-5 < err < 2e-2, err
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_export_holds_torchs_bf16_weights_and_runs_in_llamacpp(tmp_path, family):
    from gguf import GGMLQuantizationType, GGUFReader

    model, processor, path, mmproj = _export(tmp_path, "bf16", family=family)
    assert path.name == "model-bf16.gguf" and mmproj.name == "mmproj-model-bf16.gguf"
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    assert tensors["blk.0.ffn_down.weight"].tensor_type == tensors["token_embd.weight"].tensor_type \
        == GGMLQuantizationType.BF16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    assert {t.tensor_type for t in GGUFReader(str(mmproj)).tensors} == {GGMLQuantizationType.F32}
    # The bits are torch's bf16 rounding of the weights (a bf16 checkpoint's weights, exactly).
    lm = model.language_model
    want_bits = lm.get_input_embeddings().weight.detach().to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data).view(np.int16).reshape(want_bits.shape),
                          want_bits)
    llm = load_llm(path)
    ids = processor.tokenizer(TEXTS[0] + " " + TEXTS[1]).input_ids
    got = text_logits(llm, ids)
    with torch.no_grad():
        want = lm.to(torch.bfloat16).float()(torch.tensor([ids])).logits[0].numpy()
    # The same bf16 weights; llama.cpp also rounds the activations to bf16 for its products
    # (about 2e-3 here: near, but not float32's 1e-5).
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-5 < err < 1e-2, err
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_q8_0_refuses_rows_that_are_not_whole_blocks():
    layers = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(8, 48), torch.nn.Linear(48, 4))
    with pytest.raises(BunnyError, match=r"--outtype q8_0: 1.weight has rows of 8 values, not a multiple of 32"):
        check_q8_0(layers)
