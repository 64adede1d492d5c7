"""A lean decoding loop: greedy or sampled, batched with left padding, streamed.

It drives the LLM directly with a KV cache (prefill once with image features written in,
then one token per step with the vocabulary head on the last position only), which keeps
per-token overhead below `GenerationMixin.generate`'s while producing the same greedy
tokens. `model.generate(...)` from transformers also works on Bunny models.

Two decode paths share the prefill and the loop: the plain one (a growing `DynamicCache`,
eager) and, with `SamplingSettings(compile=True)`, a static cache with a compiled one-token
step (`bunny.model.decode_static`), which gives the same greedy tokens.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from transformers import DynamicCache

from bunny.errors import BunnyError
from bunny.model.modeling import positions_from_mask
from bunny.model.shared_prefix import prefill_shared


@dataclass
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    # Decode with a static KV cache and a torch.compile'd step (bunny.model.decode_static);
    # the first call per (batch, cache length) bucket compiles, once per process.
    compile: bool = False


def _pick(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> torch.Tensor:
    if settings.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < settings.top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def iter_tokens(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    settings: SamplingSettings,
    eos_token_ids: list[int],
    share_prefix: bool = False,
) -> Iterator[torch.LongTensor]:
    """Yield the next token of every row, (B,), until all rows ended or the budget is spent.
    Rows that ended keep yielding their last token; callers cut at the first stop token.

    share_prefix: rows with the same images and a common start (several questions about one
    image) run that start once; see `prefill_shared`."""
    if attention_mask.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
        raise BunnyError("batched generation needs left padding (processor(..., padding_side='left'))")
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(settings.seed)
    lm = model.language_model
    if share_prefix:
        out, mask = prefill_shared(model, input_ids, attention_mask, pixel_values)
    else:
        mask = attention_mask.long()
        embeds = model.embed_inputs(input_ids, pixel_values)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask),
                 cache=DynamicCache(config=lm.config), use_cache=True, logits_to_keep=1)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor(eos_token_ids or [-1], device=input_ids.device)
    steps = _static_steps if settings.compile else _plain_steps
    next_logits = steps(lm, out.cache, mask, settings.max_new_tokens)
    logits = out.logits[:, -1]
    for step in range(settings.max_new_tokens):
        token = _pick(logits, settings, generator)
        yield token
        done |= torch.isin(token, eos)
        if bool(done.all()) or step == settings.max_new_tokens - 1:
            return
        logits = next_logits(token)


def _plain_steps(lm, cache: DynamicCache, mask: torch.Tensor, max_new_tokens: int
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """token (B,) -> next logits (B, V), growing the DynamicCache and the mask by one column."""
    def step(token: torch.Tensor) -> torch.Tensor:
        nonlocal mask
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        position = mask.sum(-1, keepdim=True) - 1
        return lm(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache,
                  use_cache=True, logits_to_keep=1).logits[:, -1]
    return step


def _static_steps(lm, cache: DynamicCache, mask: torch.Tensor, max_new_tokens: int
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same, on a static cache with a compiled step (bunny.model.decode_static)."""
    from bunny.model.decode_static import StaticDecoder, cache_length

    # The first new token comes from the prefill; each later one takes a column.
    decoder = StaticDecoder(lm, mask.shape[0], cache_length(mask.shape[1] + max_new_tokens))
    decoder.load_prefill(cache, mask)
    return decoder.step


def generate_ids(model, inputs, settings: SamplingSettings, eos_token_ids: list[int],
                 on_step: Callable[[torch.Tensor], None] | None = None, share_prefix: bool = False) -> list[list[int]]:
    """New token ids per row, cut after the first end-of-sequence token (excluded)."""
    rows: list[list[int]] = [[] for _ in range(inputs["input_ids"].shape[0])]
    ended = [False] * len(rows)
    for token in iter_tokens(model, inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                             settings, eos_token_ids, share_prefix):
        for i, t in enumerate(token.tolist()):
            if not ended[i]:
                if t in eos_token_ids:
                    ended[i] = True
                else:
                    rows[i].append(t)
        if on_step is not None:
            on_step(token)
    return rows


def safe_stream_length(text: str, stop_strings: list[str]) -> int:
    """How much of `text` can be shown while streaming: hold back a tail that could be the
    start of a stop string, and a half-decoded multi-byte character."""
    safe = len(text)
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                safe = min(safe, len(text) - k)
                break
    if text.endswith("\ufffd"):
        safe = min(safe, len(text) - 1)
    return safe


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def generate(model, processor, prompts: list[str], images: list | None = None,
             settings: SamplingSettings | None = None, share_prefix: bool = False) -> list[str]:
    """Answers for a batch of prompt texts (already templated, with `<image>` placeholders).
    share_prefix: run the start that prompts about the same images share once (evaluation
    with several questions per image; the same answers up to float rounding)."""
    settings = settings or SamplingSettings()
    inputs = processor(text=prompts, images=images, padding_side="left").to(model.device)
    rows = generate_ids(model, inputs, settings, processor.stop_token_ids(), share_prefix=share_prefix)
    stops = settings.stop_strings + processor.stop_strings
    return [cut_at_stop(processor.decode(r), stops).strip() for r in rows]


def stream(model, processor, prompt: str, images: list | None = None,
           settings: SamplingSettings | None = None) -> Iterator[str]:
    """Text deltas of one answer as they are generated; stop strings never appear."""
    settings = settings or SamplingSettings()
    inputs = processor(text=[prompt], images=images, padding_side="left").to(model.device)
    eos = processor.stop_token_ids()
    stops = [s for s in settings.stop_strings + processor.stop_strings if s]
    tokens = (int(token[0]) for token in iter_tokens(model, inputs["input_ids"], inputs["attention_mask"],
                                                      inputs.get("pixel_values"), settings, eos))
    yield from text_deltas(itertools.takewhile(lambda t: t not in eos, tokens), processor, stops)


def text_deltas(token_ids: Iterable[int], processor, stops: list[str]) -> Iterator[str]:
    """Text deltas of one answer from its new token ids (stop tokens already left out): a
    completed stop string ends the answer and never appears, nor does half a character."""
    ids: list[int] = []
    shown = ""
    for token in token_ids:
        ids.append(token)
        text = processor.decode(ids)
        final = cut_at_stop(text, stops)
        if final != text:  # a stop string completed
            if len(final) > len(shown):
                yield final[len(shown):]
            return
        safe = safe_stream_length(text, stops)
        if safe > len(shown):
            yield text[len(shown):safe]
            shown = text[:safe]
    text = cut_at_stop(processor.decode(ids), stops)
    if len(text) > len(shown):
        yield text[len(shown):]
