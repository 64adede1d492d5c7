"""Greedy generation with one image: ours (the plain decode path and the compiled static-cache
one) vs transformers' LlavaForConditionalGeneration holding the same weights, and llama.cpp
(llama-cpp-python) on the same model exported with `bunny export gguf` (f32 and f16), all in
the same run.

    .venv/bin/python -m benchmarks.generate [--new-tokens 64] [--repeats 3] [--threads 1]

(Run as a module: benchmarks/select.py would shadow the standard library's `select`.)

Prints tokens/s for each, ours/llava (target >= 1.0), per-token time at several output
lengths (flat = the KV cache works) and the machine's limit: memory bandwidth over the
bytes of weights read per generated token (for llama.cpp f16: the f16 file's LLM weights).
Also the time of one token's weight products alone (every linear layer of the LLM applied to
one vector, as F.linear calls: the floor a torch decode step can reach), the compile cost of
each compiled shape, and batch 8 against batch 1: tokens/s over all rows end to end (eight
prompts' prefill included) and in decoding alone (per-token step time at 16 new tokens).
llama.cpp gets the same prompt text and image through its LLaVA chat handler with the
template the export embeds; it runs the prompt, then decodes the fixed number of tokens
greedily without stopping at end-of-text, as ours does (its f32 tokens are asserted equal
to ours).
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
import torch.nn.functional as F

from bunny.convert.llava_hf import to_llava_hf
from bunny.model.decode_static import compiled_shapes
from bunny.model.generation import SamplingSettings, generate_ids
from bunny.model.loading import DEFAULT_TOWER, build_model
from bunny.testing import random_image


def tower_folder() -> str:
    if (Path(DEFAULT_TOWER) / "config.json").is_file():
        return DEFAULT_TOWER
    # The shipped tower is missing: a random SigLIP of the same shape (64 tokens per image).
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    folder = Path(tempfile.mkdtemp()) / "tower"
    SiglipVisionModel(SiglipVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=6,
                                         num_attention_heads=4, image_size=64, patch_size=8)).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return str(folder)


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s that torch reads with the threads it is given (a sum over a large array,
    the same access pattern as streaming weights through a matrix-vector product)."""
    a = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best


def time_ours(model, inputs, n: int, compile: bool = False) -> float:
    t = time.perf_counter()
    rows = generate_ids(model, inputs, SamplingSettings(max_new_tokens=n, compile=compile), eos_token_ids=[])
    assert len(rows[0]) == n
    return time.perf_counter() - t


def weight_products(lm, repeats: int = 20, batch: int = 1) -> float:
    """Seconds of one decode step's matrix products alone: F.linear of every linear layer of the
    LLM (the vocabulary head included) on `batch` input vectors, the same weights as decoding reads."""
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(batch, m.in_features, dtype=m.weight.dtype) for m in linears]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            for m, x in zip(linears, xs):
                F.linear(x, m.weight, m.bias)
            best = min(best, time.perf_counter() - t)
    return best


def per_token_ms(model, inputs, lengths: tuple[int, ...], repeats: int, compile: bool) -> dict[int, float]:
    """Decode time per token at several output lengths: (total - prefill and first token) / (n - 1)."""
    prefill = min(time_ours(model, inputs, 1, compile) for _ in range(repeats))
    return {n: (min(time_ours(model, inputs, n, compile) for _ in range(2)) - prefill) / (n - 1) * 1000
            for n in lengths}


def time_llava(llava, inputs, n: int) -> tuple[float, list[int]]:
    t = time.perf_counter()
    out = llava.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - t, out[0, inputs["input_ids"].shape[1]:].tolist()


def export_llamacpp(model, processor, folder: Path) -> dict[str, tuple[Path, Path]]:
    """The model as GGUF LLM + mmproj files, f32 and f16 (`bunny export gguf`)."""
    from bunny.convert.export_gguf import export_gguf
    from bunny.model.loading import save_pretrained

    src = save_pretrained(model, processor, folder / "model")
    return {t: export_gguf(src, folder / f"gguf-{t}", outtype=t) for t in ("f32", "f16")}


class LlamaCpp:
    """One exported model in llama.cpp: the image prompt through the LLaVA chat handler (with
    the template the GGUF embeds), then fixed-length greedy decoding."""

    def __init__(self, llm_path: Path, mmproj: Path, threads: int):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Llava15ChatHandler

        self.handler = Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False)
        self.llm = Llama(model_path=str(llm_path), chat_handler=self.handler, n_ctx=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.handler.CHAT_FORMAT = self.llm.metadata["tokenizer.chat_template"]
        self.handler.DEFAULT_SYSTEM_MESSAGE = None
        from gguf import GGUFReader

        self.weight_bytes = sum(int(t.n_bytes) for t in GGUFReader(str(llm_path)).tensors)

    def run(self, image, question: str, n: int) -> tuple[float, list[int]]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        t = time.perf_counter()
        # The prompt (image encoded, text and image tokens decoded) and its first token ...
        self.llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": question}]}],
            temperature=0.0, repeat_penalty=1.0, max_tokens=1)
        prompt = self.llm.input_ids[: self.llm.n_tokens].tolist()
        # ... then n greedy tokens from the cached prompt, not stopping at end-of-text.
        ids = []
        for token in self.llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
            ids.append(int(token))
            if len(ids) == n:
                break
        return time.perf_counter() - t, ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads (on a machine shared with other jobs, 1 avoids OpenMP barrier stalls)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = build_model("smollm2-135m", tower=tower_folder())
    model.eval()
    llava = to_llava_hf(model)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]}])
    image = random_image(0, (64, 64))
    inputs = processor(text=[prompt], images=[image])
    n = args.new_tokens
    scratch = Path(tempfile.mkdtemp())  # the exports (about 1.3 GB), removed at the end
    engines = {t: LlamaCpp(llm_path, mmproj, args.threads)
               for t, (llm_path, mmproj) in export_llamacpp(model, processor, scratch).items()}

    ours_ids = generate_ids(model, inputs, SamplingSettings(max_new_tokens=n), eos_token_ids=[])[0]
    # The compiled path: its first call per (batch, cache length) compiles; same tokens asserted.
    compiled_ids = generate_ids(model, inputs, SamplingSettings(max_new_tokens=n, compile=True), eos_token_ids=[])
    assert compiled_ids[0] == ours_ids, "the compiled path's greedy tokens differ from the plain path's"
    batch8 = processor(text=[prompt] * 8, images=[[image]] * 8)
    for compile in (False, True):  # warm up (and compile) batch 8
        assert generate_ids(model, batch8, SamplingSettings(max_new_tokens=n, compile=compile), eos_token_ids=[]) \
            == [ours_ids] * 8
    compile_s = compiled_shapes(model.language_model)
    with torch.inference_mode():
        _, llava_ids = time_llava(llava, inputs, n)
    assert ours_ids == llava_ids[: len(ours_ids)], "greedy tokens differ from Llava's"
    question = "Describe the image in detail."
    _, cpp_ids = engines["f32"].run(image, question, n)
    same = sum(a == b for a, b in zip(ours_ids, cpp_ids))
    assert cpp_ids[:8] == ours_ids[:8], f"llama.cpp f32 starts with other tokens: {cpp_ids[:8]} vs {ours_ids[:8]}"

    ours_t, compiled_t, llava_t, cpp_t = [], [], [], {t: [] for t in engines}
    b8_t = {False: [], True: []}
    with torch.inference_mode():
        for _ in range(args.repeats):  # interleaved so drift on a shared machine hits all
            ours_t.append(time_ours(model, inputs, n))
            compiled_t.append(time_ours(model, inputs, n, compile=True))
            for compile in (False, True):
                b8_t[compile].append(time_ours(model, batch8, n, compile))
            llava_t.append(time_llava(llava, inputs, n)[0])
            for t, engine in engines.items():
                cpp_t[t].append(engine.run(image, question, n)[0])
    ours_tps, compiled_tps, llava_tps = n / min(ours_t), n / min(compiled_t), n / min(llava_t)
    b8_tps = {c: 8 * n / min(v) for c, v in b8_t.items()}
    cpp_tps = {t: n / min(v) for t, v in cpp_t.items()}

    # Per-token cost at growing output lengths: decode time = total - prefill (1 token run).
    with torch.inference_mode():
        per_token = {c: per_token_ms(model, inputs, (16, 128), args.repeats, c) for c in (False, True)}
        per_token8 = {c: per_token_ms(model, batch8, (16,), args.repeats, c) for c in (False, True)}
    products_ms = weight_products(model.language_model) * 1000
    products8_ms = weight_products(model.language_model, batch=8) * 1000

    weight_bytes = sum(p.numel() * p.element_size() for p in model.language_model.parameters())
    bandwidth = memory_bandwidth()
    limit = bandwidth / weight_bytes
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"prompt tokens: {inputs['input_ids'].shape[1]} (64 image), new tokens: {n}")
    print(f"ours:  {ours_tps:7.1f} tokens/s   (plain decode path: DynamicCache, eager)")
    print(f"ours compiled: {compiled_tps:7.1f} tokens/s   (static cache, torch.compile'd step; compile s by "
          f"(batch, cache length): " + ", ".join(f"{k}: {v:.0f}" for k, v in compile_s.items()) + ")")
    print(f"llava: {llava_tps:7.1f} tokens/s   (transformers LlavaForConditionalGeneration.generate)")
    print(f"ratio ours/llava: {ours_tps / llava_tps:.2f}   (target >= 1.0); "
          f"compiled/plain: {compiled_tps / ours_tps:.2f}")
    for c, name in ((False, "plain"), (True, "compiled")):
        ms = per_token[c]
        print(f"{name}: decode ms/token at 16 / 128 new tokens: {ms[16]:.1f} / {ms[128]:.1f}; "
              f"weight products alone {products_ms:.1f} ms, token/products {ms[16] / products_ms:.2f} (target <= 1.1); "
              f"batch 8: {b8_tps[c]:.1f} tokens/s = {b8_tps[c] / (compiled_tps if c else ours_tps):.2f}x batch 1 "
              f"end to end, decoding alone {per_token8[c][16]:.1f} ms per step = "
              f"{8 * ms[16] / per_token8[c][16]:.2f}x batch 1's tokens/s (target >= 4)")
    print(f"batch 8's products alone {products8_ms:.1f} ms against batch 1's {products_ms:.1f} ms: a batch-8 step "
          f"with nothing but its products would give {8 * products_ms / products8_ms:.2f}x batch 1's tokens/s")
    print(f"weights read per token: {weight_bytes / 2**20:.0f} MiB; memory read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    print(f"machine limit: {limit:.1f} tokens/s; ours reaches {ours_tps / limit:.0%} of it, llava {llava_tps / limit:.0%}")
    print(f"llama.cpp f32 tokens equal to ours: {same}/{n} (first 8 asserted)")
    for t, tps in cpp_tps.items():
        cpp_limit = bandwidth / engines[t].weight_bytes
        print(f"llama.cpp {t}: {tps:7.1f} tokens/s; weights {engines[t].weight_bytes / 2**20:.0f} MiB, "
              f"limit {cpp_limit:.1f} tokens/s, reaches {tps / cpp_limit:.0%} of it")
    print(f"fp32 batch 1 against llama.cpp f32: plain {ours_tps / cpp_tps['f32']:.2f}x, compiled "
          f"{compiled_tps / cpp_tps['f32']:.2f}x (target >= 0.45)")
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
