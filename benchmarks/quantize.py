"""Weight-only int8 / int4 against float32 on a demo-sized Bunny (the embedded SmolLM2-135M,
the shipped tower, the demo's word-fitted projector, as tests/convert/test_llamacpp_demo.py
builds it): the LLM's bytes, batch-1 decode tokens/s, and the share of greedy answers to the
synthetic demo's held-out questions that are identical to float32's.

    .venv/bin/python -m benchmarks.quantize [--questions 113] [--new-tokens 64] [--repeats 3]

Decode speed: one image prompt, a fixed number of new tokens (no stop), best of the repeats,
the modes interleaved so that other load on the machine falls on all of them alike.
"""
from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

from bunny.model.generation import SamplingSettings, generate, generate_ids
from bunny.model.loading import build_model
from bunny.model.templates import IMAGE_PLACEHOLDER
from bunny.serve.quantize import quantize_model, weight_bytes
from bunny.testing import held_out_questions
from bunny.train.demo_ground import fit_word_projector

MODES = [("float32", None, None), ("int8", "int8", None), ("int8 g32", "int8", 32), ("int4 g32", "int4", 32),
         ("int4 g64", "int4", 64)]
# int4 g128 is refused on SmolLM2-135M: its 576-wide layers are not a multiple of 128.


def demo_model():
    torch.manual_seed(0)
    model, processor = build_model("smollm2-135m", template="bunny-nosystem")
    fit_word_projector(model, processor.tokenizer, seed=0, background_word="background")
    return model.eval(), processor


def answers(model, processor, questions, max_new_tokens: int = 8) -> list[str]:
    prompts = [processor.apply_chat_template([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{q}"}])
               for _, q in questions]
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    out = []
    for start in range(0, len(prompts), 16):
        out += generate(model, processor, prompts[start:start + 16],
                        [[image] for image, _ in questions[start:start + 16]], settings)
    return out


def decode_seconds(model, inputs, new_tokens: int) -> float:
    t = time.perf_counter()
    generate_ids(model, inputs, SamplingSettings(max_new_tokens=new_tokens), [])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=100, help="at least this many (whole images)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with open("/proc/loadavg") as f:
        print(f"machine: {platform.processor() or platform.machine()}, "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
              f"load average {' '.join(f.read().split()[:3])}", flush=True)
    base, processor = demo_model()
    models = {}
    for name, mode, group in MODES:
        models[name] = base if mode is None else quantize_model(copy.deepcopy(base), mode, group_size=group)

    questions = held_out_questions(args.questions)
    image, question = questions[0]
    prompt = processor.apply_chat_template([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"}])
    inputs = processor(text=[prompt], images=[[image]])
    for m in models.values():
        decode_seconds(m, inputs, 4)  # warm-up
    best = {name: float("inf") for name in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            best[name] = min(best[name], decode_seconds(m, inputs, args.new_tokens))

    reference = None
    fp32_bytes = weight_bytes(base.language_model)
    print(f"{len(questions)} held-out questions, {args.new_tokens} new tokens after a "
          f"{inputs['input_ids'].shape[1]}-token image prompt, best of {args.repeats}")
    print("| mode | LLM MiB | vs float32 | decode tokens/s | vs float32 | answers identical to float32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in models.items():
        got = answers(m, processor, questions)
        reference = got if reference is None else reference
        same = sum(a == b for a, b in zip(reference, got))
        mib = weight_bytes(m.language_model) / 2**20
        tps = args.new_tokens / best[name]
        print(f"| {name} | {mib:.0f} | {mib / (fp32_bytes / 2**20):.2f}x | {tps:.1f} | "
              f"{best['float32'] / best[name]:.2f}x | {same}/{len(questions)} = {same / len(questions):.1%} |",
              flush=True)
    with open("/proc/loadavg") as f:
        print(f"load average at the end {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
