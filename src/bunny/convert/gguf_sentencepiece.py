"""A SentencePiece-style Hugging Face tokenizer (Llama-2's, Phi-3-mini's, MiniCPM's: BPE with
byte fallback over text whose spaces are "▁") as llama.cpp's `llama` tokenizer model, read from
`tokenizer.json` alone (no `sentencepiece` package, no `tokenizer.model`).

llama.cpp does not read merges for this model: it merges the adjacent pair whose concatenation
is the vocabulary entry with the highest score, leftmost first, as SentencePiece does. Hugging
Face's BPE merges the pair with the lowest merge rank. The two agree when the merges are what
a SentencePiece model implies (every split of an entry into two entries is a merge, and all
merges giving one entry are adjacent in rank, as transformers' converter writes them): each
entry then scores minus the rank of its first merge. Merges of another shape (a BPE trained
without that rule) are refused, since llama.cpp would split text differently.

Text handling is one of the shapes llama.cpp expresses with `tokenizer.ggml.add_space_prefix`:
a "▁" before every piece of text between special tokens (the `Prepend` normalizer of Llama-2's
and Phi-3-mini's published tokenizer.json: exact), or never. transformers 5 rebuilds Llama-family
tokenizers with a `Metaspace` pre-tokenizer instead, which differs from llama.cpp (and from the
published tokenizer.json) in two places, so the export warns: it adds no "▁" before text that
already starts with a space, and with `prepend_scheme: first` (non-legacy, Phi-3-mini's) none
before text that follows a special token inside one string.
"""
from __future__ import annotations

import json
import warnings

from bunny.errors import BunnyError

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
ADDED_SCORE = -1000.0  # added and padding rows, as llama.cpp's converter scores them

_REPLACE_SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
_PREPEND = {"type": "Prepend", "prepend": "▁"}
_DECODER = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]
_STRIP_FIRST_SPACE = {"type": "Strip", "content": " ", "start": 1, "stop": 0}


def is_sentencepiece_style(data: dict) -> bool:
    """Whether a tokenizer.json (as a dict) is a BPE with byte fallback (the SentencePiece family)."""
    return data["model"].get("type") == "BPE" and bool(data["model"].get("byte_fallback"))


def _sequence(item: dict | None, key: str) -> list[dict]:
    if not item:
        return []
    return item.get(key, []) if item.get("type") == "Sequence" else [item]


def prefix_scheme(data: dict) -> tuple[str, bool]:
    """("always" | "first" | "never", whether a Metaspace pre-tokenizer does it), or a BunnyError."""
    norm = _sequence(data.get("normalizer"), "normalizers")
    pre = _sequence(data.get("pre_tokenizer"), "pretokenizers")
    if not pre and norm == [_PREPEND, _REPLACE_SPACE]:
        return "always", False
    if not pre and norm == [_REPLACE_SPACE]:
        return "never", False
    if not norm and len(pre) == 1 and pre[0].get("type") == "Metaspace" and pre[0].get("replacement") == "▁" \
            and pre[0].get("split") is False and pre[0].get("prepend_scheme") in ("always", "first", "never"):
        return pre[0]["prepend_scheme"], True
    raise BunnyError(
        "cannot export the tokenizer to GGUF: a SentencePiece-style tokenizer with normalizer "
        f"{json.dumps(data.get('normalizer'))} and pre-tokenizer {json.dumps(data.get('pre_tokenizer'))} "
        "(llama.cpp expresses Prepend('▁') + Replace(' ', '▁'), Replace(' ', '▁') alone, or a Metaspace('▁') "
        "pre-tokenizer that does not split)")


def _check_model(data: dict, scheme: str) -> None:
    model = data["model"]
    odd = {k: model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix")
           if model.get(k) not in (None, "")}
    if model.get("ignore_merges"):
        odd["ignore_merges"] = True
    if odd:
        raise BunnyError(f"cannot export the tokenizer to GGUF: a SentencePiece-style BPE with {odd} "
                         "(llama.cpp's SentencePiece merging has no such option)")
    missing = [t for t in BYTE_TOKENS if t not in model["vocab"]]
    if missing:
        raise BunnyError(f"cannot export the tokenizer to GGUF: byte fallback without the byte tokens "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} (llama.cpp needs all 256)")
    decoder = _sequence(data.get("decoder"), "decoders")
    want = _DECODER + ([] if scheme == "never" else [_STRIP_FIRST_SPACE])
    if decoder != want:
        raise BunnyError(f"cannot export the tokenizer to GGUF: decoder {json.dumps(data.get('decoder'))} is not "
                         f"the one llama.cpp's detokenizer matches for this tokenizer ({json.dumps(want)})")


def merge_scores(vocab: dict[str, int], merges: list, skip: set[str]) -> dict[str, float]:
    """Score per merged entry (minus the rank of its first merge), or a BunnyError where llama.cpp's
    highest-score merging would split text differently from these merges."""
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    rank: dict[str, int] = {}
    previous = None
    for r, (left, right) in enumerate(pairs):
        result = left + right
        if result != previous and result in rank:
            raise BunnyError(
                f"cannot export the tokenizer to GGUF: the merges giving {result!r} are not adjacent in rank "
                f"(merge {r}: {left!r} + {right!r}); llama.cpp ranks a merge by the entry it gives, so it "
                "would split text differently (merges are not those of a SentencePiece model)")
        rank.setdefault(result, r)
        previous = result
    merge_set = set(pairs)
    for piece in vocab:
        if piece in skip or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab and left not in skip and right not in skip \
                    and (left, right) not in merge_set:
                raise BunnyError(
                    f"cannot export the tokenizer to GGUF: {left!r} + {right!r} gives the entry {piece!r} but is "
                    "not a merge; llama.cpp merges any such pair, so it would split text differently "
                    "(merges are not those of a SentencePiece model)")
    return {piece: -float(r) for piece, r in rank.items()}


def sentencepiece_vocab(tokenizer, vocab_size: int, warn: bool = True) -> dict:
    """Everything the GGUF's tokenizer keys need: tokens, scores, types, add_space_prefix."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    scheme, metaspace = prefix_scheme(data)
    _check_model(data, scheme)
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    normalized = [t["content"] for t in added.values() if t.get("normalized") and data.get("normalizer")]
    if normalized:
        raise BunnyError(f"cannot export the tokenizer to GGUF: added tokens {normalized} are matched after "
                         "normalization; llama.cpp matches added tokens in the raw text")
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise BunnyError(f"the tokenizer has {len(by_id)} tokens but the LLM only {vocab_size} embeddings")
    base = data["model"]["vocab"]
    added_text = {t["content"] for t in added.values()}
    scores = merge_scores(base, data["model"].get("merges", []), added_text | set(BYTE_TOKENS))
    bytes_ = set(BYTE_TOKENS)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]  # rows past the tokenizer: unused
    token_scores, types = [], []
    for i, tok in enumerate(tokens):
        if i not in by_id:
            token_scores.append(ADDED_SCORE)
            types.append(UNUSED)
        elif i in added:
            token_scores.append(ADDED_SCORE)
            types.append(UNKNOWN if i == tokenizer.unk_token_id else CONTROL if added[i].get("special")
                         else USER_DEFINED)
        else:  # characters and byte tokens are never the result of a merge: their score is unused
            token_scores.append(scores.get(tok, 0.0))
            types.append(BYTE if tok in bytes_ else NORMAL)
    if metaspace and scheme != "never" and warn:
        where = "text that starts with a space" + (", and text right after a special token inside one string"
                                                   if scheme == "first" else "")
        warnings.warn(f"llama.cpp puts a '▁' before every piece of text, this tokenizer (a Metaspace pre-tokenizer, "
                      f"prepend_scheme {scheme!r}) not before {where}: such text tokenizes differently in llama.cpp "
                      "(as the published tokenizer.json of Llama-2 or Phi-3 does)", stacklevel=2)
    return {"tokens": tokens, "scores": token_scores, "types": types, "add_space_prefix": scheme != "never"}
