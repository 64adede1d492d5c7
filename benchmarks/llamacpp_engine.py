"""Chat through `--engine llama.cpp` against llama-cpp-python's own chat completion and the torch
path, on a demo-sized Bunny (SmolLM2-135M, the shipped tower, the demo's word-fitted projector)
exported to f32 GGUF: one image and a question that asks for a long answer, greedy, the same
new tokens on every path (each stops where the model ends its answer, or at --new-tokens).

    .venv/bin/python -m benchmarks.llamacpp_engine [--new-tokens 96] [--repeats 3]

- llama.cpp's own: `Llama.create_chat_completion` with llama-cpp-python's Llava15ChatHandler
  and the template the export embeds (the whole request: prompt, image, decoding).
- bunny on llama.cpp: `ChatSession.ask` on the engine, streamed (what `bunny chat` runs).
- bunny on torch: `ChatSession.ask` on the torch model, streamed.
Tokens/s = new tokens / wall time of the whole answer; best of the repeats, paths interleaved.
"""
from __future__ import annotations

import argparse
import base64
import io
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bunny.model.generation import SamplingSettings
from bunny.model.loading import save_pretrained
from bunny.serve.chat import ChatSession
from bunny.serve.llamacpp_engine import open_engine
from bunny.testing import held_out_questions
from benchmarks.quantize import demo_model

QUESTION = "Describe the picture in detail, then tell a long story about it."


def main() -> None:
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with open("/proc/loadavg") as f:
        print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"load average {' '.join(f.read().split()[:3])}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="bunny-llamacpp-bench-"))
    try:
        model, processor = demo_model()
        src = save_pretrained(model, processor, root / "model")
        engine, engine_processor = open_engine(src)
        image = held_out_questions(1)[0][0]
        settings = SamplingSettings(max_new_tokens=args.new_tokens)

        handler = Llava15ChatHandler(clip_model_path=str(engine.mmproj), verbose=False)
        own = Llama(model_path=str(engine.gguf), chat_handler=handler, n_ctx=4096, n_threads=engine.n_threads,
                    verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # as the engine
        handler.CHAT_FORMAT = own.metadata["tokenizer.chat_template"]
        handler.DEFAULT_SYSTEM_MESSAGE = None
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

        def llamacpp_own():
            reply = own.create_chat_completion(
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": QUESTION}]}],
                temperature=0.0, repeat_penalty=1.0, max_tokens=args.new_tokens)
            return reply["choices"][0]["message"]["content"].strip(), reply["usage"]["completion_tokens"]

        def session_answer(m, p):
            def run():
                session = ChatSession(m, p, settings)
                session.image = image
                pieces = []
                return session.ask(QUESTION, on_text=pieces.append), None
            return run

        paths = {"llama.cpp's own (Llava15ChatHandler)": llamacpp_own,
                 "bunny chat, --engine llama.cpp": session_answer(engine, engine_processor),
                 "bunny chat, --engine torch": session_answer(model, processor)}
        best, answers = {k: float("inf") for k in paths}, {}
        for _ in range(args.repeats):
            for name, run in paths.items():
                t = time.perf_counter()
                answers[name] = run()
                best[name] = min(best[name], time.perf_counter() - t)
        n_tokens = answers["llama.cpp's own (Llava15ChatHandler)"][1]
        texts = {a for a, _ in answers.values()}
        print(f"{n_tokens} new tokens; the three answers {'are identical' if len(texts) == 1 else 'DIFFER'}")
        print("| path | seconds per answer | tokens/s | vs llama.cpp's own |")
        print("|---|---:|---:|---:|")
        own_s = best["llama.cpp's own (Llava15ChatHandler)"]
        for name in paths:
            print(f"| {name} | {best[name]:.2f} | {n_tokens / best[name]:.1f} | {own_s / best[name]:.2f}x |")
        if len(texts) > 1:
            for name, (a, _) in answers.items():
                print(f"  {name}: {a!r}")
        with open("/proc/loadavg") as f:
            print(f"load average at the end {' '.join(f.read().split()[:3])}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
