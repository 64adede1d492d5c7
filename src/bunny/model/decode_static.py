"""Decoding with a static KV cache and a compiled one-token step.

The plain path (`generation.iter_tokens`) grows a `DynamicCache` and runs every layer's Python
for every new token. Here the prompt is prefilled exactly as there (same code, same logits), its
keys and values are copied once into a preallocated `transformers.StaticCache`, and each new
token is one call of a `torch.compile`d step with fixed shapes:

    token (B, 1), position (B, 1), valid (B, L) -> logits of the next token (B, V)

`valid` marks the cache columns a row may attend to (its real prompt tokens, then every decoded
token); the step turns it into the attention mask inside the compiled graph, so the Python work
per token is the same for 2 layers or 40.

Shapes are bucketed: the cache length L is the tokens needed rounded up to a multiple of
`CACHE_BUCKET`, so prompts of different lengths share a compiled step. Each (model, B, L) is
compiled once per process, on its first use, and that cost is logged and kept
(`compiled_shapes`). Known shapes run under `torch.compiler.set_stance("fail_on_recompile")`:
a step that would silently recompile is an error instead.

For another decode loop (the server's), the API is `StaticDecoder`: build one for a model, a
batch size and a cache length (`cache_length`), `load_prefill` a prefilled `DynamicCache` and
its 2-D mask, then call `step(token)` for the logits of every row's next token.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import weakref

import torch
from transformers import DynamicCache, StaticCache

from bunny.errors import BunnyError

CACHE_BUCKET = 256
# torch.compile keeps at most this many compiled versions of one function (dynamo's default
# recompile limit) and runs it uncompiled beyond it; we refuse instead.
MAX_COMPILED_SHAPES = 8

log = logging.getLogger("bunny.decode")
_compiled: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[int, int], float]]" = weakref.WeakKeyDictionary()


def cache_length(needed: int, bucket: int = CACHE_BUCKET) -> int:
    """The cache length for `needed` tokens: rounded up to a multiple of `bucket`."""
    if needed < 1:
        raise BunnyError(f"a static cache needs room for at least one token, not {needed}")
    return -(-needed // bucket) * bucket


def compiled_shapes(lm: torch.nn.Module) -> dict[tuple[int, int], float]:
    """(batch, cache length) -> seconds its first (compiling) call took, for one language model."""
    return dict(_compiled.get(lm, {}))


def check_compiler() -> None:
    """torch.compile on the CPU builds C++ kernels: refuse early, with the fix, when no compiler is found."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    if not any(shutil.which(n) for n in names):
        raise BunnyError(
            f"compiled decoding needs a C++ compiler for torch.compile on the CPU, and none of {', '.join(names)} "
            "was found on PATH: install one (e.g. g++) or decode without compiling (compile=False / no --compile)")


def _step(lm, token, position, valid, cache, additive: bool):
    """One token for every row. token, position (B, 1); valid (B, L) bool; -> (B, V) logits."""
    mask = valid[:, None, None, :]  # (B, 1, 1, L): every query row sees the same columns
    if additive:  # eager attention adds its mask to the scores
        mask = torch.zeros(mask.shape, dtype=lm.dtype, device=mask.device).masked_fill(~mask, torch.finfo(lm.dtype).min)
    out = lm(input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True,
             logits_to_keep=1)
    return out.logits[:, -1]


_compiled_step = torch.compile(_step, fullgraph=True, dynamic=False)


class StaticDecoder:
    """Decode steps of one language model over a static cache of `batch` rows and `length` columns."""

    def __init__(self, lm, batch: int, length: int, compile: bool = True):
        attention = lm.config._attn_implementation
        if attention not in ("sdpa", "eager"):
            raise BunnyError(f"the static decode path supports sdpa and eager attention; this model uses {attention!r}")
        self.cache = StaticCache(config=lm.config, max_cache_len=length)
        if any(layer.is_sliding for layer in self.cache.layers):
            raise BunnyError("the static decode path supports full-attention models only; this model has "
                             "sliding-window layers (decode without compiling)")
        if compile:
            check_compiler()
        self.lm, self.batch, self.length, self.compile = lm, batch, length, compile
        self.additive = attention == "eager"
        device = lm.device
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.column = 0

    def load_prefill(self, prefill_cache: DynamicCache, mask: torch.Tensor) -> None:
        """Copy a prefilled cache (B, heads, W, dim per layer) and its (B, W) mask into the static cache;
        the next token goes to column W, at position (real tokens of the row)."""
        width = mask.shape[1]
        if mask.shape[0] != self.batch or width >= self.length:
            raise BunnyError(f"a prefill of {mask.shape[0]} rows x {width} tokens does not fit a static cache of "
                             f"{self.batch} rows x {self.length} columns")
        if self.column:  # reused for another request
            self.cache.reset()
        for i, layer in enumerate(prefill_cache.layers):  # once per request, not per token
            self.cache.update(layer.keys, layer.values, i)
        self.valid.zero_()
        self.valid[:, :width] = mask.bool()
        self.position.copy_(mask.long().sum(-1, keepdim=True))
        self.column = width

    @torch.inference_mode()
    def step(self, token: torch.LongTensor) -> torch.Tensor:
        """Logits (B, V) of the token after `token` (B,) in every row."""
        if self.column >= self.length:
            raise BunnyError(f"the static cache is full ({self.length} columns)")
        self.valid[:, self.column] = True
        args = (self.lm, token[:, None], self.position, self.valid, self.cache, self.additive)
        if not self.compile:
            logits = _step(*args)
        else:
            logits = self._compiled(args)
        self.position += 1
        self.column += 1
        return logits

    def _compiled(self, args) -> torch.Tensor:
        shapes = _compiled.setdefault(self.lm, {})
        key = (self.batch, self.length)
        if key in shapes:
            with torch.compiler.set_stance("fail_on_recompile"):
                return _compiled_step(*args)
        if sum(len(s) for s in _compiled.values()) >= MAX_COMPILED_SHAPES:
            raise BunnyError(f"{MAX_COMPILED_SHAPES} decode shapes are already compiled in this process "
                             f"({sorted(k for s in _compiled.values() for k in s)}); torch.compile would run a "
                             "new one uncompiled: use fewer batch sizes or lengths, or decode without compiling")
        start = time.perf_counter()
        try:
            logits = _compiled_step(*args)
        except Exception as e:  # inductor's errors have no common public base class
            raise BunnyError(f"compiling the decode step (batch {self.batch}, cache {self.length}) failed: "
                             f"{type(e).__name__}: {e}; decode without compiling (compile=False / no --compile)") from e
        shapes[key] = time.perf_counter() - start
        log.info("compiled the decode step for batch %d, cache %d in %.1f s (once per process)",
                 self.batch, self.length, shapes[key])
        return logits
