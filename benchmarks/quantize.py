"""Weight-only int8 / int4 and bfloat16 weights against float32 on a Bunny: the LLM's bytes,
batch-1 decode tokens/s, and the share of greedy answers to the synthetic demo's held-out
questions that are identical to float32's.

    .venv/bin/python -m benchmarks.quantize [--model FOLDER [--llamacpp]] [--questions 113] [--new-tokens 64]
        [--repeats 3] [--paths NAME ...] [--compile]

--model: a bunny checkpoint, e.g. the demo's trained model (`bunny demo` writes it, LoRA merged,
to outputs/demo/stage2/model); without it, a demo-sized untrained model (the
embedded SmolLM2-135M, the shipped tower, the demo's word-fitted projector, as
tests/convert/test_llamacpp_demo.py builds it), whose answers ramble.

Decode speed: one image prompt, a fixed number of new tokens (no stop; prompt included), best of
the repeats, the paths interleaved so that other load on the machine falls on all of them alike.
--llamacpp adds llama.cpp running the model's f32, bf16 and q8_0 GGUF exports through bunny's llama.cpp
engine (`--engine llama.cpp --gguf ...`): the CPU path whose kernels read 8-bit weights directly.
bfloat16 (the whole model, as `--dtype bfloat16` loads it; and the LLM alone, the tower and
projector kept in float32) runs where the CPU has native bf16 (`bunny.model.dtypes`). For the
float paths it also prints one decode step's weight products alone (the floor of a torch step).
"""
from __future__ import annotations

import argparse
import copy
import platform
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.generate import weight_products
from bunny.model.dtypes import bf16_refusal, cpu_flags
from bunny.model.generation import SamplingSettings, generate, generate_ids
from bunny.model.loading import build_model
from bunny.model.templates import IMAGE_PLACEHOLDER
from bunny.serve.llamacpp_engine import LlamaCppEngine
from bunny.serve.quantize import quantize_model, weight_bytes
from bunny.testing import held_out_questions
from bunny.train.demo_ground import fit_word_projector

MODES = [("float32", None, None), ("int8", "int8", None), ("int8 g32", "int8", 32), ("int4 g32", "int4", 32),
         ("int4 g64", "int4", 64)]
# int4 g128 is refused on SmolLM2-135M: its 576-wide layers are not a multiple of 128.


def _llm_in_bf16(base):
    model = copy.deepcopy(base)
    model.language_model.to(torch.bfloat16)
    return model


# name -> a copy of the float32 model: the whole model in bfloat16 (as `--dtype bfloat16` loads it),
# and its LLM alone (the tower and projector kept in float32).
BF16_PATHS = {"bfloat16": lambda base: copy.deepcopy(base).to(torch.bfloat16), "bfloat16 LLM": _llm_in_bf16}


def demo_model(folder: str | None = None):
    if folder:
        from bunny.model.loading import load_pretrained

        model, processor = load_pretrained(folder)
        return model.eval(), processor
    torch.manual_seed(0)
    model, processor = build_model("smollm2-135m", template="bunny-nosystem")
    fit_word_projector(model, processor.tokenizer, seed=0, background_word="background")
    return model.eval(), processor


def answers(model, processor, questions, max_new_tokens: int = 8, compile: bool = False) -> list[str]:
    """Greedy answers of a torch model (batches of 16) or a llama.cpp engine (one at a time)."""
    run = model.generate if isinstance(model, LlamaCppEngine) else partial(generate, model)
    prompts = [processor.apply_chat_template([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{q}"}])
               for _, q in questions]
    settings = SamplingSettings(max_new_tokens=max_new_tokens, compile=compile)
    out = []
    for start in range(0, len(prompts), 16):
        out += run(processor, prompts[start:start + 16], [[image] for image, _ in questions[start:start + 16]],
                   settings)
    return out


def decode_seconds(model, inputs, new_tokens: int, compile: bool = False) -> float:
    t = time.perf_counter()
    generate_ids(model, inputs, SamplingSettings(max_new_tokens=new_tokens, compile=compile), [])
    return time.perf_counter() - t


class _NoStop:
    """The processor, except that no token ends an answer: fixed-length decoding for timing."""

    def __init__(self, processor):
        self._processor = processor

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def stop_token_ids(self) -> list[int]:
        return []


def llamacpp_paths(folder: str, scratch: Path, prompt: str, image, processor) -> dict:
    """name -> (LLM bytes, seconds(new_tokens), answers(questions)) for llama.cpp on the f32, bf16 and
    q8_0 exports of `folder` (`bunny export gguf --outtype ...`), through bunny's llama.cpp engine."""
    from bunny.convert.export_gguf import export_gguf
    from bunny.serve.llamacpp_engine import open_engine

    paths = {}
    for outtype in ("f32", "bf16", "q8_0"):
        llm, mmproj = export_gguf(folder, scratch / outtype, outtype=outtype)
        engine, engine_processor = open_engine(folder, llm, mmproj)
        no_stop = _NoStop(engine_processor)

        def seconds(n, engine=engine, no_stop=no_stop):
            t = time.perf_counter()
            got = list(engine.token_ids(no_stop, prompt, [image], SamplingSettings(max_new_tokens=n)))
            assert len(got) == n
            return time.perf_counter() - t

        def answers_of(questions, engine=engine, engine_processor=engine_processor):
            return answers(engine, engine_processor, questions)

        paths[f"llama.cpp {outtype} GGUF"] = (llm.stat().st_size, seconds, answers_of)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a bunny checkpoint folder (default: a demo-sized untrained model)")
    ap.add_argument("--questions", type=int, default=100, help="at least this many (whole images)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paths", nargs="+", metavar="NAME",
                    help="measure only these paths beside float32 (names as in the table: int8, 'int4 g64', "
                         "bfloat16, ...; default: all)")
    ap.add_argument("--compile", action="store_true",
                    help="every torch path decodes with the static cache and compiled step (`--compile`), "
                         "float32 included; each shape compiles on its first call, before the timing")
    ap.add_argument("--llamacpp", action="store_true",
                    help="also llama.cpp on the model's f32, bf16 and q8_0 GGUF exports (needs --model)")
    args = ap.parse_args()
    if args.llamacpp and not args.model:
        ap.error("--llamacpp needs --model (a checkpoint folder to export)")
    wanted = set(args.paths or []) | {"float32"}
    known = [name for name, _, _ in MODES] + list(BF16_PATHS)
    if args.paths and not wanted <= set(known):
        ap.error(f"--paths: unknown {sorted(wanted - set(known))}; known: {known}")
    with open("/proc/loadavg") as f:
        print(f"machine: {platform.processor() or platform.machine()}, "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
              f"load average {' '.join(f.read().split()[:3])}", flush=True)
    base, processor = demo_model(args.model)
    questions = held_out_questions(args.questions)
    image, question = questions[0]
    prompt = processor.apply_chat_template([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"}])
    inputs = processor(text=[prompt], images=[[image]])

    models = {name: base if mode is None else quantize_model(copy.deepcopy(base), mode, group_size=group)
              for name, mode, group in MODES if not args.paths or name in wanted}
    refusal = bf16_refusal("cpu", cpu_flags(), torch.backends.cpu.get_cpu_capability())
    if refusal:
        print(f"bfloat16 not measured: {refusal}")
    else:
        models.update({name: make(base) for name, make in BF16_PATHS.items() if not args.paths or name in wanted})
    paths = {name: (weight_bytes(m.language_model), lambda n, m=m: decode_seconds(m, inputs, n, args.compile),
                    lambda qs, m=m: answers(m, processor, qs, compile=args.compile))
             for name, m in models.items()}
    scratch = Path(tempfile.mkdtemp(prefix="bunny-quantize-bench-"))
    try:
        if args.llamacpp:
            paths.update(llamacpp_paths(args.model, scratch, prompt, image, processor))
        for _, seconds, _ in paths.values():
            seconds(args.new_tokens if args.compile else 4)  # warm-up (compiled: the timed shape)
        best = {name: float("inf") for name in paths}
        for _ in range(args.repeats):  # interleaved, so that other load falls on every path alike
            for name, (_, seconds, _) in paths.items():
                best[name] = min(best[name], seconds(args.new_tokens))

        print(f"{len(questions)} held-out questions, {args.new_tokens} new tokens after a "
              f"{inputs['input_ids'].shape[1]}-token image prompt, best of {args.repeats}")
        print("| path | LLM MiB | vs float32 | decode tokens/s | vs float32 | answers identical to float32 |")
        print("|---|---:|---:|---:|---:|---:|")
        reference = None
        fp32_bytes = paths["float32"][0]
        for name, (size, _, answers_of) in paths.items():
            got = answers_of(questions)
            reference = got if reference is None else reference
            same = sum(a == b for a, b in zip(reference, got))
            tps = args.new_tokens / best[name]
            print(f"| {name} | {size / 2**20:.0f} | {size / fp32_bytes:.2f}x | {tps:.1f} | "
                  f"{best['float32'] / best[name]:.2f}x | {same}/{len(questions)} = {same / len(questions):.1%} |",
                  flush=True)
        # The floor of a float decode step: its weight products alone (int paths hold no nn.Linear).
        floors = {name: weight_products(models[name].language_model) * 1000 for name in models
                  if name == "float32" or name in BF16_PATHS}
        print("one decode step's weight products alone: " + ", ".join(f"{k} {v:.1f} ms" for k, v in floors.items()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with open("/proc/loadavg") as f:
        print(f"load average at the end {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
