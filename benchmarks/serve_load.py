"""Load on the OpenAI-compatible server (continuous batching), on 127.0.0.1 only.

    .venv/bin/python -m benchmarks.serve_load                      # mixed lengths, then 1 vs 16 clients
    .venv/bin/python -m benchmarks.serve_load --skip-mixed --clients 1 4 16 --max-tokens 32
    .venv/bin/python -m benchmarks.serve_load --quantization     # int8 vs float32: memory, agreement, speed

(Run as a module: benchmarks/select.py would shadow the standard library's `select`.)

The model is the demo-sized one: SmolLM2-135M composed with the shipped 64-token tower (or
a random SigLIP of the same shape when the tower is absent); `--llm small` puts a random
6-layer, 256-wide Llama with SmolLM2's tokenizer in its place, for a loaded machine. Its projector is untrained, so
the answers mean nothing; the server is told to accept images anyway, since only the cost
matters here. Every request carries an image and is greedy.

Mixed lengths: `--short-clients` clients (8) each send `--short-requests` requests for
`--short-tokens` tokens (16) back to back, first alone, then again while one client's
request for `--long-tokens` tokens (256) is being decoded. Targets: the short requests' p50
latency with the long one running within 1.5x of their p50 alone; no errors. The short ones
must join the long one's batch (counted by the scheduler), and the long one must still be
running when the last short one ends, or the comparison says nothing.

Throughput: each client sends its requests back to back (closed loop); every level is bounded
by a request count and a time limit. Prints requests/s, generated tokens/s, p50/p95 latency,
errors, and the ratios to one client (target: 16 clients >= 4x one client's tokens/s).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.generate import tower_folder
from bunny.testing import random_image


def data_url(seed: int) -> str:
    buf = io.BytesIO()
    random_image(seed, (64, 64)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGES = [data_url(i) for i in range(8)]


def request_body(i: int, max_tokens: int, stream: bool = False) -> dict:
    return {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "stream": stream, "messages": [{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGES[i % 8]}},
                                    {"type": "text", "text": f"Describe picture number {i} in detail."}]}]}


def run_level(url: str, clients: int, n_requests: int, max_tokens: int, time_limit: float) -> dict:
    """`clients` threads share `n_requests` requests; stops early at `time_limit` seconds."""
    lock, counter = threading.Lock(), iter(range(n_requests))
    latencies, tokens, errors = [], [], []
    start = time.perf_counter()

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while time.perf_counter() - start < time_limit:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = http.post(url + "/v1/chat/completions", json=request_body(i, max_tokens))
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t)
                        tokens.append(r.json()["usage"]["completion_tokens"])
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "wall_s": wall,
            "req_s": len(latencies) / wall, "tok_s": sum(tokens) / wall, "tokens": tokens,
            "p50_s": float(np.percentile(latencies, 50)) if latencies else float("nan"),
            "p95_s": float(np.percentile(latencies, 95)) if latencies else float("nan"),
            "first_error": errors[0] if errors else ""}


def long_request(url: str, max_tokens: int, started: threading.Event, result: dict) -> None:
    """One streamed request for `max_tokens` tokens; `started` is set at its first content."""
    t = time.perf_counter()
    n, error = 0, ""
    with httpx.Client(timeout=600) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=request_body(99, max_tokens, stream=True)) as r:
            if r.status_code != 200:
                error = f"{r.status_code}: {r.read()[:200]!r}"
            for line in r.iter_lines() if not error else ():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    n += 1  # a chunk per text delta: close to one per token
                    started.set()
    started.set()
    result.update(latency_s=time.perf_counter() - t, chunks=n, error=error, ended_at=time.perf_counter())


def mixed_lengths(url: str, args, scheduler) -> dict:
    """Short requests alone, then beside one long request; p50 latencies and their ratio."""
    n = args.short_clients * args.short_requests
    alone = run_level(url, args.short_clients, n, args.short_tokens, args.time_limit)
    print(f"short alone ({args.short_clients} clients, {args.short_tokens} tokens): {describe(alone)}", flush=True)
    joined_before = scheduler.joined_running
    started, long_result = threading.Event(), {}
    long_thread = threading.Thread(target=long_request, args=(url, args.long_tokens, started, long_result))
    long_thread.start()
    started.wait(300)
    mixed = run_level(url, args.short_clients, n, args.short_tokens, args.time_limit)
    shorts_ended = time.perf_counter()
    long_thread.join()
    return {"alone": alone, "mixed": mixed, "long": long_result,
            "long_outlived_shorts": long_result.get("ended_at", 0) > shorts_ended,
            "joined_running": scheduler.joined_running - joined_before,
            "ratio": mixed["p50_s"] / alone["p50_s"]}


def describe(r: dict) -> str:
    return (f"{r['requests']:3d} requests in {r['wall_s']:6.1f} s, {r['req_s']:5.2f} req/s, "
            f"{r['tok_s']:6.1f} generated tok/s, p50 {r['p50_s']:5.2f} s, p95 {r['p95_s']:5.2f} s, "
            f"errors {r['errors']} {r['first_error']}")


def small_llm(folder: Path) -> str:
    """A random 6-layer Llama of width 256 with SmolLM2-135M's tokenizer, saved in `folder`:
    the same serving work as the demo model at about a tenth of its bytes per token."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bunny.model.embedded import resolve_llm

    tokenizer = AutoTokenizer.from_pretrained(resolve_llm("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@torch.inference_mode()
def step_costs(args) -> None:
    """The LLM's own costs behind the server's: a 90-token prefill and a decode step (one row
    left padded by 10, as in a batch) at batch 1, 4 and 16."""
    from transformers import DynamicCache

    from bunny.model.loading import build_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        llm = "smollm2-135m" if args.llm == "demo" else small_llm(Path(tmp))
        model, _ = build_model(llm, tower=tower_folder())
    lm = model.language_model.eval()
    for batch in (1, 4, 16):
        ids = torch.randint(0, 1000, (batch, 90))
        mask = torch.ones(batch, 90, dtype=torch.long)
        mask[0, :10] = 0
        t = time.perf_counter()
        out = lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                 cache=DynamicCache(), use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t
        token, steps = out.logits[:, -1].argmax(-1), 10
        t = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
            out = lm(input_ids=token[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                     cache=out.cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1)
        print(f"batch {batch:2d}: prefill of 90 tokens {prefill * 1000:6.0f} ms, "
              f"decode step {(time.perf_counter() - t) / steps * 1000:6.1f} ms", flush=True)


def load_benchmark(args) -> None:
    from bunny.model.loading import build_model
    from bunny.serve.app import ServerSettings, create_app
    from bunny.serve.server import running_server

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        llm = "smollm2-135m" if args.llm == "demo" else small_llm(Path(tmp))
        model, processor = build_model(llm, tower=tower_folder())
    model.eval()
    model.config.projector_trained = True  # random projector: fine for timing, see the docstring
    batch = max(args.clients + [args.short_clients + 1])
    app = create_app(model, processor, ServerSettings(model_name="bench", max_batch_size=batch,
                                                      max_new_tokens_cap=max(1024, args.long_tokens)))
    scheduler = app.state.scheduler
    failed = []
    with running_server(app) as server:
        run_level(server.url, 1, 1, args.max_tokens, args.time_limit)  # warm-up
        if not args.skip_mixed:
            m = mixed_lengths(server.url, args, scheduler)
            print(f"short beside a {args.long_tokens}-token request: {describe(m['mixed'])}")
            print(f"long request: {m['long'].get('latency_s', float('nan')):.1f} s, {m['long'].get('chunks')} "
                  f"text chunks, error {m['long'].get('error') or 'none'}; still running when the short ones "
                  f"ended: {m['long_outlived_shorts']}; rows that joined a running batch: {m['joined_running']}")
            print(f"short p50 beside the long request / alone: {m['ratio']:.2f}x (target <= 1.5)", flush=True)
            if (m["ratio"] > 1.5 or m["alone"]["errors"] or m["mixed"]["errors"] or m["long"].get("error")
                    or not m["long_outlived_shorts"] or not m["joined_running"]):
                failed.append("mixed lengths")
        results = []
        for clients in args.clients:
            n = max(args.min_requests, args.requests_per_client * clients)
            results.append(run_level(server.url, clients, n, args.max_tokens, args.time_limit))
            print(f"clients {clients:3d}: {describe(results[-1])}", flush=True)
            failed += ["errors"] if results[-1]["errors"] else []
        print(f"prefills: {scheduler.prefills_run}, decode steps: {scheduler.steps_run}, "
              f"largest batch: {scheduler.largest_batch}")
    base = results[0]
    for r in results[1:]:
        ratio = r["tok_s"] / base["tok_s"]
        print(f"{r['clients']} clients / {base['clients']} client: {r['req_s'] / base['req_s']:.2f}x requests/s, "
              f"{ratio:.2f}x tokens/s" + (" (target >= 4)" if r["clients"] == 16 else ""))
        if r["clients"] == 16 and base["clients"] == 1 and ratio < 4:
            failed.append("16-client throughput")
    print("targets missed: " + ", ".join(failed) if failed else "targets met")


def quantization_report(args) -> None:
    """int8 dynamic quantisation of SmolLM2-135M's linear layers vs float32: bytes, outputs, speed."""
    from bunny.model.generation import SamplingSettings, generate_ids
    from bunny.model.loading import load_pretrained
    from bunny.serve.quantize import quantize_model

    def state_bytes(module) -> int:
        buf = io.BytesIO()
        torch.save(module.state_dict(), buf)  # tied weights are stored once, packed int8 as stored
        return buf.tell()

    fp32, processor = load_pretrained("smollm2-135m")
    int8, _ = load_pretrained("smollm2-135m")
    quantize_model(int8, "int8")
    prompts = ["Write a short story about a rabbit.", "What is the capital of France?",
               "Explain how a bicycle works.", "List three colours of the rainbow.",
               "What is 12 times 7?", "Describe a sunset over the sea.", "Give me a tip for learning Python.",
               "Why is the sky blue?"]
    texts = [processor.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    inputs = processor(text=texts, padding_side="left")
    settings = SamplingSettings(max_new_tokens=args.max_tokens)
    eos = processor.stop_token_ids()
    with torch.inference_mode():
        t = time.perf_counter()
        a = generate_ids(fp32, inputs, settings, eos)
        t_fp32 = time.perf_counter() - t
        t = time.perf_counter()
        b = generate_ids(int8, inputs, settings, eos)
        t_int8 = time.perf_counter() - t
        # Teacher-forced on the float32 answers: next-token logits of both models at every position.
        full = [processor.tokenize(x) + y for x, y in zip(texts, a)]
        top1, diffs = [], []
        for ids in full:
            x = torch.tensor([ids])
            la, lb = fp32.language_model(input_ids=x).logits[0], int8.language_model(input_ids=x).logits[0]
            top1.append((la.argmax(-1) == lb.argmax(-1)).float().mean().item())
            diffs.append(((la - lb).abs().max(-1).values / la.abs().max(-1).values).mean().item())
    prefix = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))) for x, y in zip(a, b)]
    same = sum(x == y for x, y in zip(a, b))
    mb_a, mb_b = state_bytes(fp32.language_model) / 2**20, state_bytes(int8.language_model) / 2**20
    print(f"LLM weights: float32 {mb_a:.0f} MiB, int8 {mb_b:.0f} MiB ({1 - mb_b / mb_a:.0%} smaller)")
    print(f"greedy answers identical: {same}/{len(a)}; mean identical prefix {np.mean(prefix):.1f} of "
          f"{np.mean([len(x) for x in a]):.1f} tokens")
    print(f"teacher-forced top-1 agreement: {np.mean(top1):.1%}; mean max |logit diff| / max |logit|: {np.mean(diffs):.3f}")
    print(f"batch of {len(a)} x {args.max_tokens} tokens: float32 {t_fp32:.1f} s, int8 {t_int8:.1f} s")
    for p, x, y in list(zip(prompts, a, b))[:2]:
        print(f"  {p!r}\n    fp32: {processor.decode(x)!r}\n    int8: {processor.decode(y)!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request in the throughput levels")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=6)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per level, at most")
    ap.add_argument("--llm", choices=["demo", "small"], default="demo",
                    help="demo: SmolLM2-135M; small: a random 6-layer, 256-wide Llama with its tokenizer")
    ap.add_argument("--step-costs", action="store_true",
                    help="only the LLM's prefill and decode-step times at batch 1, 4 and 16 (no server)")
    ap.add_argument("--skip-mixed", action="store_true", help="only the throughput levels")
    ap.add_argument("--short-clients", type=int, default=8)
    ap.add_argument("--short-requests", type=int, default=2, help="per short client, back to back")
    ap.add_argument("--short-tokens", type=int, default=16)
    ap.add_argument("--long-tokens", type=int, default=256)
    ap.add_argument("--quantization", action="store_true", help="measure int8 vs float32 instead")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 on a machine other work shares, where the threads "
                         "of one batched product wait for each other")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"load average {' '.join(load)}")
    if args.quantization:
        quantization_report(args)
    elif args.step_costs:
        step_costs(args)
    else:
        load_benchmark(args)


if __name__ == "__main__":
    main()
