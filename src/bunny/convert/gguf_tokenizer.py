"""A Hugging Face byte-level BPE tokenizer as llama.cpp's `gpt2` tokenizer model, plus the
chat template (as Jinja) and the special tokens, written into the LLM's GGUF.

The pre-tokenizer (how text is split before BPE) is named as llama.cpp's own converter
(convert_hf_to_gguf.py, `get_vocab_base_pre`) names it: the token ids of a fixed check text
are hashed, and the hash identifies a published tokenizer whose splitting rules llama.cpp
implements under that name. A tokenizer whose hash is not known to us (one trained anew,
such as the tests' tiny ones) is named only when its `tokenizer.json` pre-tokenizer is
exactly one llama.cpp implements (GPT-2's byte-level regex, or SmolLM's digits + GPT-2).
Anything else is refused: a wrong name would silently split text differently.

SentencePiece-style tokenizers (BPE with byte fallback) go to llama.cpp's `llama` model
instead (bunny.convert.gguf_sentencepiece). For both, the added tokens' whitespace stripping
must be one llama.cpp applies: none, or Phi-3's (llama.cpp keys it on the model name).
"""
from __future__ import annotations

import hashlib
import json

from bunny.convert.gguf_sentencepiece import is_sentencepiece_style, sentencepiece_vocab
from bunny.errors import BunnyError

# llama.cpp's converter encodes this text (whitespace runs, emoji, digit runs, scripts,
# contractions in odd cases) and hashes the ids; the same text gives the same hashes here.
CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
    '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
    'កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
    '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? '
    'I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)

# sha256 of str(token ids of CHECK_TEXT) -> llama.cpp's pre-tokenizer name, for the published
# tokenizers of the LLM families bunny composes (values from llama.cpp's converter table).
KNOWN_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",      # GPT-2
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",      # Phi-2 (Bunny-v1_0-3B)
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",  # StableLM-2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen1.5 (Bunny-v1_0-2B-zh)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama-3 (Bunny-Llama-3-8B-V)
}

_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
# tokenizer.json pre-tokenizers that are exactly one of llama.cpp's splitting rules.
_STRUCTURAL = {
    "gpt-2": [_GPT2_BYTE_LEVEL],
    "smollm": [{"type": "Digits", "individual_digits": True}, _GPT2_BYTE_LEVEL],
}
# llama.cpp's token types (gguf.TokenType).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# llama.cpp gives every added token of a model whose name contains one of these Phi-3's
# stripping: whitespace after it is dropped, except after these three; `</s>` must exist.
PHI3_NAMES = ("phi3", "phi-3")
PHI3_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")


def check_text_hash(tokenizer) -> str:
    return hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def _steps(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    # trim_offsets only moves character offsets, never token ids.
    return [{k: v for k, v in step.items() if k != "trim_offsets"} for step in steps]


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for this tokenizer, or a BunnyError saying why none fits."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    digest = check_text_hash(tokenizer)
    if digest in KNOWN_TOKENIZERS:
        return KNOWN_TOKENIZERS[digest]
    steps = _steps(data.get("pre_tokenizer"))
    if data.get("normalizer") is None:
        for name, expected in _STRUCTURAL.items():
            if steps == expected:
                return name
    raise BunnyError(
        "cannot export the tokenizer to GGUF: llama.cpp has no pre-tokenizer known to match it "
        f"(check-text hash {digest} is not one of llama.cpp's known tokenizers for bunny's LLM families; "
        f"normalizer {json.dumps(data.get('normalizer'))}, pre-tokenizer {json.dumps(data.get('pre_tokenizer'))[:200]} "
        "is neither GPT-2's byte-level regex nor SmolLM's digits + GPT-2); convert the LLM with llama.cpp's "
        "convert_hf_to_gguf.py, which names more tokenizers")


def _flag_first_last(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer itself puts BOS first / EOS last on a plain text (as bunny tokenizes)."""
    ids = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..vocab_size-1 (rows past the tokenizer become unused)."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise BunnyError(f"the tokenizer has {len(by_id)} tokens but the LLM only {vocab_size} embeddings")
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in data.get("added_tokens", [])}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [CONTROL if i in special else USER_DEFINED if i in added else NORMAL if i in by_id else UNUSED
             for i in range(vocab_size)]
    return tokens, types


def strips_as_phi3(tokenizer) -> bool:
    """True where the added tokens strip as llama.cpp strips Phi-3's, False where none strips;
    a BunnyError for any other stripping (llama.cpp cannot express it)."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    added = data.get("added_tokens", [])
    odd = [t["content"] for t in added if t.get("lstrip") or t.get("single_word")]
    if odd:
        raise BunnyError(f"cannot export the tokenizer to GGUF: added tokens {odd} strip whitespace on their left "
                         "or match single words only; llama.cpp has neither")
    rstrip = {t["content"] for t in added if t.get("rstrip")}
    if not rstrip:
        return False
    contents = {t["content"] for t in added}
    phi3 = contents - set(PHI3_NO_RSTRIP)
    if rstrip != phi3 or not {"</s>", *PHI3_NO_RSTRIP} <= contents:
        raise BunnyError(
            f"cannot export the tokenizer to GGUF: added tokens {sorted(rstrip)} drop the whitespace after them; "
            "llama.cpp does that only as for Phi-3 (every added token but <unk>, <s> and <|endoftext|>)")
    return True


def gguf_name(name: str, tokenizer) -> str:
    """`general.name`: llama.cpp gives added tokens Phi-3's stripping exactly when the name contains
    phi3 or phi-3, so the name says so where the tokenizer strips as Phi-3's and only there."""
    phi3 = strips_as_phi3(tokenizer)
    marked = any(m in name.lower() for m in PHI3_NAMES)
    if phi3 and not marked:
        return f"{name}-phi3"
    if not phi3 and marked:
        out = name
        for m in PHI3_NAMES:  # Phi-3 / phi3 -> Phi_3 / phi_3, whatever the case
            while m in out.lower():
                at = out.lower().index(m)
                out = out[:at] + out[at:at + 3] + "_3" + out[at + len(m):]
        return out
    return name


def check_tokenizer(tokenizer) -> None:
    """A BunnyError now for anything add_tokenizer would refuse."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    strips_as_phi3(tokenizer)
    if is_sentencepiece_style(data):
        sentencepiece_vocab(tokenizer, len(tokenizer.get_vocab()), warn=False)
    else:
        _check_byte_level(data)
        pre_tokenizer_name(tokenizer)


def _check_byte_level(data: dict) -> None:
    kind = data["model"].get("type")
    if kind != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise BunnyError(f"cannot export the tokenizer to GGUF: a {kind} model with decoder "
                         f"{(data.get('decoder') or {}).get('type')!r} (supported: byte-level BPE, as GPT-2's, "
                         "and BPE with byte fallback, as SentencePiece's in Llama-2 and Phi-3)")


def add_tokenizer(writer, tokenizer, vocab_size: int, chat_template: str | None = None) -> None:
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if is_sentencepiece_style(data):
        spm = sentencepiece_vocab(tokenizer, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(spm["tokens"])
        writer.add_token_scores(spm["scores"])
        writer.add_token_types(spm["types"])
        writer.add_add_space_prefix(spm["add_space_prefix"])
    else:
        _check_byte_level(data)
        pre = pre_tokenizer_name(tokenizer)
        tokens, types = vocabulary(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            add(token_id)
    add_bos, add_eos = _flag_first_last(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if chat_template:
        writer.add_chat_template(chat_template)
