"""The llama.cpp engine (`--engine llama.cpp`) against the torch path on a tiny Bunny exported
to f32 GGUF: the same greedy answers through chat's, evaluation's and the server's code; the
export cache; every refusal.

A random tiny model's logits are close together, and llama.cpp's image features differ from
torch's in the last digits (its GELU reads a table of f16 values), so for some seeds a greedy
image answer picks another token after a few steps (seeds 0-5: 8/8 answers equal; seeds 6 and
7: 7/8). The demo-sized model, whose choices are not near-tied, gives 113/113
(tests/convert/test_llamacpp_demo.py)."""
import argparse
import base64
import io
import os
import time

import httpx
import pytest

from bunny.errors import BunnyError
from bunny.eval.predict import predict
from bunny.model.generation import SamplingSettings, generate, stream
from bunny.model.loading import load_pretrained
from bunny.serve.app import ServerSettings, create_app
from bunny.serve.chat import ChatSession
from bunny.serve.llamacpp_engine import (CACHE_SUFFIX, LlamaCppEngine, check_engine_arguments, export_outtype,
                                         open_engine, serving)
from bunny.serve.server import running_server
from bunny.testing import random_image, save_tiny_bunny

SEED = 5
NEW_TOKENS = 8
QUESTIONS = ["What is in the image?", "Describe it.", "Is it red?", "How many?"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    src = save_tiny_bunny(tmp_path_factory.mktemp("engine") / "m", seed=SEED)
    model, processor = load_pretrained(src)
    engine, engine_processor = open_engine(src)
    return src, model, processor, engine, engine_processor


def _prompts(processor):
    with_image = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                            {"type": "text", "text": q}]}])
                  for q in QUESTIONS]
    text_only = [processor.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    return with_image + text_only, [[random_image(i)] for i in range(len(QUESTIONS))] + [[] for _ in QUESTIONS]


def test_generate_and_stream_equal_the_torch_path(pair):
    _, model, processor, engine, engine_processor = pair
    prompts, images = _prompts(processor)
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS)
    want = [generate(model, processor, [p], [i] if i else None, settings)[0] for p, i in zip(prompts, images)]
    assert engine.generate(engine_processor, prompts, images, settings) == want
    assert len(set(want)) > 2  # the answers depend on the question and the image
    streamed = list(engine.stream(engine_processor, prompts[0], images[0], settings))
    assert "".join(streamed).strip() == want[0]
    assert streamed == list(stream(model, processor, prompts[0], images[0], settings))


def test_chat_session_answers_equal(pair):
    _, model, processor, engine, engine_processor = pair
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS)
    ours, theirs = ChatSession(model, processor, settings), ChatSession(engine, engine_processor, settings)
    for session in (ours, theirs):
        session.image = random_image(0)
    for question in QUESTIONS[:2]:  # two turns: the second prompt holds the first answer
        pieces = []
        assert theirs.ask(question, on_text=pieces.append) == ours.ask(question)
        assert "".join(pieces).strip() == theirs.messages[-1]["content"]


def test_eval_predictions_equal(pair, tmp_path):
    _, model, processor, engine, engine_processor = pair
    samples = [{"question_id": i, "question": q, "images": [random_image(i)], "answer": "yes",
                "category": "random", "image": f"{i}.png"} for i, q in enumerate(QUESTIONS)]
    want = predict("pope", samples, model, processor, tmp_path / "torch.jsonl", batch_size=2,
                   max_new_tokens=NEW_TOKENS, progress=False)
    got = predict("pope", samples, engine, engine_processor, tmp_path / "llamacpp.jsonl", batch_size=2,
                  max_new_tokens=NEW_TOKENS, progress=False)
    assert got == want
    with pytest.raises(BunnyError, match="--share-prefix runs on the torch engine"):
        predict("pope", samples, engine, engine_processor, tmp_path / "x.jsonl", share_prefix=True, progress=False)
    with pytest.raises(BunnyError, match="--share-prefix and --compile run on the torch engine"):
        predict("pope", samples, engine, engine_processor, tmp_path / "x.jsonl", share_prefix=True, compile=True,
                progress=False)
    with pytest.raises(BunnyError, match="image mode 'square' differs from the exported mmproj's 'pad'"):
        predict("scienceqa", [{"question_id": 0, "question": "Which?", "choices": ["a", "b"], "hint": "",
                               "images": [random_image(0)], "answer": 0}],
                engine, engine_processor, tmp_path / "s.jsonl", progress=False)


def test_server_answers_equal_one_request_at_a_time(pair):
    _, model, processor, engine, engine_processor = pair
    served, served_processor, scheduler = serving(engine, engine_processor, max_queue=4)
    app = create_app(served, served_processor, ServerSettings(model_name="m"), scheduler=scheduler)
    image = random_image(1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                           {"type": "text", "text": QUESTIONS[1]}]}
    with running_server(app) as server:
        body = {"model": "m", "messages": [message], "max_tokens": NEW_TOKENS, "temperature": 0}
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": QUESTIONS[1]}]}])
    want = generate(model, processor, [prompt], [[image]], SamplingSettings(max_new_tokens=NEW_TOKENS))[0]
    assert reply["choices"][0]["message"]["content"] == want
    assert reply["usage"]["completion_tokens"] <= NEW_TOKENS
    assert events[-1] == "data: [DONE]" and len(events) > 2


def test_export_cache_is_reused_until_the_checkpoint_changes(pair):
    src = pair[0]
    cache = src.with_name(src.name + CACHE_SUFFIX)
    gguf = cache / "model-f32.gguf"
    first = gguf.stat().st_mtime_ns
    open_engine(src)[0].close()
    assert gguf.stat().st_mtime_ns == first  # reused
    config = src / "config.json"
    later = time.time() + 5
    os.utime(config, (later, later))
    open_engine(src)[0].close()
    assert gguf.stat().st_mtime_ns != first  # exported again


def test_dtype_runs_its_own_export_type_each_cached_apart(pair, capsys):
    from gguf import GGMLQuantizationType, GGUFReader

    from bunny.cli import main

    src = pair[0]
    cache = src.with_name(src.name + CACHE_SUFFIX)
    f32 = (cache / "model-f32.gguf").stat().st_mtime_ns
    assert [export_outtype(d, None) for d in (None, "float32", "bfloat16", "float16")] == ["f32", "f32", "bf16", "f16"]
    engine, _ = open_engine(src, outtype=export_outtype("bfloat16", None))
    engine.close()
    bf16 = cache / "model-bf16.gguf"
    types = {t.name: t.tensor_type for t in GGUFReader(str(bf16)).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.BF16
    made = bf16.stat().st_mtime_ns
    for outtype in ("f32", "bf16", "f32"):  # switching types reuses each one's export
        open_engine(src, outtype=outtype)[0].close()
    assert (cache / "model-f32.gguf").stat().st_mtime_ns == f32 and bf16.stat().st_mtime_ns == made
    # Through the CLI: bunny chat --engine llama.cpp --dtype bfloat16 answers from the bf16 export.
    assert main(["chat", "--model", str(src), "--engine", "llama.cpp", "--dtype", "bfloat16",
                 "--prompt", QUESTIONS[1], "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert bf16.stat().st_mtime_ns == made
    with pytest.raises(BunnyError, match="--dtype bfloat16 picks the type of the export"):
        export_outtype("bfloat16", "model.gguf")


def test_explicit_pair_and_refusals(pair, tmp_path):
    src, *_ = pair
    cache = src.with_name(src.name + CACHE_SUFFIX)
    engine, _ = open_engine(src, cache / "model-f32.gguf", cache / "mmproj-model-f32.gguf")
    assert isinstance(engine, LlamaCppEngine)
    engine.close()
    with pytest.raises(BunnyError, match="--gguf .*missing.gguf: no such file"):
        open_engine(src, tmp_path / "missing.gguf", cache / "mmproj-model-f32.gguf")
    with pytest.raises(BunnyError, match="--gguf and --mmproj go together"):
        open_engine(src, cache / "model-f32.gguf")
    with pytest.raises(BunnyError, match="--mmproj .*: llama.cpp could not load it"):
        open_engine(src, cache / "model-f32.gguf", cache / "model-f32.gguf")
    with pytest.raises(BunnyError, match="runs a local bunny checkpoint folder; smollm2-135m is not a folder"):
        open_engine("smollm2-135m")
    clip = save_tiny_bunny(tmp_path / "clip", tower="clip")
    with pytest.raises(BunnyError, match="(?i)clip"):  # export refuses CLIP towers (llama.cpp's graph differs)
        open_engine(clip)
    assert not clip.with_name(clip.name + CACHE_SUFFIX).exists()


def test_prompt_and_context_refusals(pair):
    _, _, processor, engine, engine_processor = pair
    prompts, images = _prompts(processor)
    with pytest.raises(BunnyError, match="holds 1 <image> placeholders but 0 images"):
        engine.generate(engine_processor, prompts[:1], [[]])
    with pytest.raises(BunnyError, match="exceed the llama.cpp context"):
        engine.generate(engine_processor, prompts[4:5], [[]], SamplingSettings(max_new_tokens=10**6))


def test_cli_options_the_engine_does_not_take_are_refused():
    args = argparse.Namespace(engine="llama.cpp", gguf=None, mmproj=None)
    with pytest.raises(BunnyError, match=r"does not take --device, --quantize \(it runs the GGUF on the CPU"):
        check_engine_arguments(args, {"--device": "cuda", "--quantize": "int8", "--dtype": None})
    check_engine_arguments(args, {"--device": "cpu", "--share-prefix": False})
    torch_args = argparse.Namespace(engine="torch", gguf="m.gguf", mmproj=None)
    with pytest.raises(BunnyError, match="--gguf applies to --engine llama.cpp only"):
        check_engine_arguments(torch_args, {})
