"""A demo-sized Bunny (the embedded SmolLM2-135M, the shipped tower, an mlp2x_gelu projector
fitted as the demo starts it) exported to f32 GGUF and run in llama.cpp through
llama-cpp-python's LLaVA chat handler: greedy answers to the synthetic demo's questions
equal bunny's own, and text-only logits agree.

The projector maps background patches to the embedding of " background". The demo's own
start maps them to the zero vector: the LLM's first RMSNorm scales such near-zero tokens up
to unit size, noise included, so llama.cpp's float differences in the image features
(4e-4 relative: its GELU reads a table of f16 values) move the logits by up to 0.7 and
flip near-tied greedy choices. With a word for the background the same image-feature
difference moves the logits by under 1e-3."""
import base64
import io

import numpy as np
import pytest
import torch
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler

from bunny.convert.export_gguf import export_gguf
from bunny.convert.gguf_tokenizer import CHECK_TEXT
from bunny.model.generation import SamplingSettings, generate
from bunny.model.loading import build_model, save_pretrained
from bunny.model.templates import IMAGE_PLACEHOLDER
from bunny.testing import held_out_questions
from bunny.train.demo_ground import fit_word_projector
from tests.convert.llamacpp_helpers import KV_TYPES, load_llm, text_logits

pytestmark = pytest.mark.slow
MIN_QUESTIONS = 100
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-gguf")
    torch.manual_seed(0)
    model, processor = build_model("smollm2-135m", template="bunny-nosystem")
    # Answers that depend on the image (see the module's docstring for the background word).
    fit_word_projector(model, processor.tokenizer, seed=0, background_word="background")
    src = save_pretrained(model, processor, root / "model")
    llm_path, mmproj = export_gguf(src, root / "gguf", outtype="f32")
    return model.eval(), processor, llm_path, mmproj


def _data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: llama.cpp decodes the same pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_llamacpp_answers_equal_bunnys_on_demo_questions(demo):
    model, processor, llm_path, mmproj = demo
    questions = held_out_questions(MIN_QUESTIONS)
    prompts = [processor.apply_chat_template([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{q}"}])
               for _, q in questions]
    settings = SamplingSettings(max_new_tokens=MAX_NEW_TOKENS)
    ours = []
    for start in range(0, len(prompts), 16):
        ours += generate(model, processor, prompts[start:start + 16],
                         [[image] for image, _ in questions[start:start + 16]], settings)

    handler = Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False)
    llm = Llama(model_path=str(llm_path), chat_handler=handler, n_ctx=512, n_threads=2, verbose=False,
                type_k=KV_TYPES["f32"], type_v=KV_TYPES["f32"])
    handler.CHAT_FORMAT = llm.metadata["tokenizer.chat_template"]  # the template the export embedded
    handler.DEFAULT_SYSTEM_MESSAGE = None  # the template supplies bunny's (here: none)
    theirs = []
    for image, question in questions:
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(image)}},
                                                   {"type": "text", "text": question}]}],
            temperature=0.0, repeat_penalty=1.0, max_tokens=MAX_NEW_TOKENS)
        theirs.append(reply["choices"][0]["message"]["content"].strip())

    differ = [(q, a, b) for (_, q), a, b in zip(questions, ours, theirs) if a != b]
    assert not differ, f"{len(differ)}/{len(questions)} answers differ (question, bunny, llama.cpp): {differ[:10]}"
    # The answers depend on the image (the fitted projector): not one answer for everything.
    assert len(set(ours)) > 3


def test_text_logits_agree(demo):
    model, processor, llm_path, _ = demo
    llm = load_llm(llm_path)
    ids = processor.tokenizer("USER: What colour is the sky on a clear day? ASSISTANT: It is blue.").input_ids
    got = text_logits(llm, ids)
    with torch.no_grad():
        want = model.language_model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max(), rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_smollm2_tokenizer_is_named_and_splits_as_in_llamacpp(demo):
    _, processor, llm_path, _ = demo
    llm = load_llm(llm_path, vocab_only=True)
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"  # what llama.cpp's own converter writes for SmolLM2
    tok = processor.tokenizer
    for text in (CHECK_TEXT, "Is there a red circle in the image? 12345 apples,\n\n and <|im_end|> 3.14",
                 "USER: <|endoftext|> ASSISTANT: yes"):
        want = tok(text).input_ids
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == want, text
