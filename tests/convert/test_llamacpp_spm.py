"""SentencePiece-style tokenizers (Llama-2's, Phi-3-mini's) in the GGUF export, proven inside
llama.cpp (llama-cpp-python): tokenization both ways, logits of a tiny phi3 and llama LLM,
and a whole tiny Bunny with its mmproj.

The tokenizer is built as Phi-3-mini's and Llama-2's tokenizer.json are: a BPE with byte
fallback whose merges are what transformers' SentencePiece converter writes (every split of
an entry into two entries, ranked by the entry), `<unk>`, `<s>`, `</s>`, the 256 `<0xNN>`
byte tokens, and Phi-3's added tokens with their right-stripping."""
import json
import warnings

import llama_cpp
import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bunny.convert.export_gguf import export_gguf
from bunny.convert.gguf_sentencepiece import sentencepiece_vocab
from bunny.convert.gguf_tokenizer import check_tokenizer, gguf_name
from bunny.errors import BunnyError
from bunny.model.config import BunnyConfig
from bunny.model.loading import load_pretrained, save_pretrained
from bunny.model.modeling import BunnyForConditionalGeneration
from bunny.model.processor import BunnyProcessor
from bunny.testing import random_image, tiny_image_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config
from tests.convert.llamacpp_helpers import detokenize, image_embeddings, load_llm, text_logits

CORPUS = ["A chat between a curious user and an artificial intelligence assistant.",
          "The assistant gives helpful, detailed, and polite answers to the user's questions.",
          "USER: What is in the image? ASSISTANT: A red circle on the left and two blue squares.",
          "What color is the square? It is yellow, purple, orange, white or black.",
          "Is there a cat? 3 33 333 3333 and 3.14159 in 2024.", "def f(x):\n    return x  # code"]
# Phi-3-mini's added tokens (content, special, rstrip), as its tokenizer_config.json declares them.
PHI3_ADDED = [("<unk>", True, False), ("<s>", True, False), ("</s>", False, True), ("<|endoftext|>", True, False),
              ("<|assistant|>", True, True), ("<|system|>", True, True), ("<|end|>", True, True),
              ("<|user|>", True, True)]
LLAMA2_ADDED = [("<unk>", True, False), ("<s>", True, False), ("</s>", True, False)]
PAD_ROWS = 5  # Phi-3-mini's embeddings have rows past its tokenizer, too
# Model folders (the GGUF's general.name, from which llama.cpp decides Phi-3's token stripping)
# and the name written: marked phi3 exactly where the tokenizer strips as Phi-3's does.
FOLDER = {"phi3": "Bunny-v1_1-4B", "phi3-json": "Bunny-v1_0-4B", "llama2": "bunny-phi3-llama2",
          "llama2-noprefix": "llama2"}
GGUF_NAME = {"phi3": "Bunny-v1_1-4B-phi3", "phi3-json": "Bunny-v1_0-4B-phi3", "llama2": "bunny-phi_3-llama2",
             "llama2-noprefix": "llama2"}

PLAIN_TEXTS = [
    "Hello world", "digits 3 33 333 3.14159 2024, tab\tnewline\n  two  spaces and trailing ",
    "unicode: café naïve Ünïcödé 日本語 🦙 ✅", "bytes \x00\x01\x7f end", "What color is the square? ASSISTANT:",
    "A chat between a curious user and an artificial intelligence assistant. USER: What is 123 + 4567?",
]
LEADING_SPACE = [" leading space", "  two leading spaces"]
SPECIAL_TEXTS = ["<|user|>\nWhat is 3?<|end|>\n<|assistant|> It is 3.<|end|>", "an answer.<|endoftext|>USER: more",
                 "</s>  after eos", "<s> twice <unk> unknown", "a</s>b <s>  c"]
# Where transformers 5's Metaspace rebuild and llama.cpp (with the published tokenizer.json) part:
# no "▁" added before text that starts with a space, nor, non-legacy, after a special token.
DIFFERS = {"phi3": LEADING_SPACE + SPECIAL_TEXTS, "phi3-json": [], "llama2-noprefix": [],
           "llama2": LEADING_SPACE + ["<s> twice <unk> unknown", "a</s>b <s>  c"]}


def _sentencepiece_model() -> tuple[dict, list]:
    """Vocabulary in SentencePiece's order (controls, bytes, merged pieces, characters) and the
    merges transformers' converter derives from it."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=360, show_progress=False))
    learned = [p for p, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1])]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in [p for p in learned if len(p) > 1] + [p for p in learned if len(p) == 1]:
        vocab.setdefault(piece, len(vocab))
    merges = []
    for piece in list(vocab)[259:]:
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    return vocab, merges


def spm_tokenizer(folder, kind: str, as_written: bool = False):
    """Tokenizer files as published, loaded as transformers loads them. kind: `phi3` (Phi-3-mini's
    files: transformers 5 rebuilds them as a non-legacy LlamaTokenizer), `phi3-json` (the same files
    with tokenizer.json used as written: "▁" before every piece of text, as SentencePiece), `llama2`
    (Llama-2's, legacy LlamaTokenizer), `llama2-noprefix` (the same with `add_prefix_space: false`: no
    "▁" before text anywhere). as_written: the tokenizer.json itself, whatever the kind."""
    vocab, merges = _sentencepiece_model()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    llama2 = kind.startswith("llama2")
    added = LLAMA2_ADDED if llama2 else PHI3_ADDED
    tok.add_tokens([AddedToken(c, special=s, rstrip=r, normalized=False) for c, s, r in added])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    json_class = as_written or kind == "phi3-json"
    config = {"tokenizer_class": "PreTrainedTokenizerFast" if json_class else "LlamaTokenizer",
              "legacy": llama2, "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
              "eos_token": "</s>" if llama2 else "<|endoftext|>", "unk_token": "<unk>",
              "added_tokens_decoder": {str(tok.token_to_id(c)): {
                  "content": c, "lstrip": False, "normalized": False, "rstrip": r, "single_word": False,
                  "special": s} for c, s, r in added}}
    if not llama2:
        config["pad_token"] = "<|endoftext|>"
    if kind == "llama2-noprefix" and not as_written:
        config["add_prefix_space"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder)


def _bunny(tmp_path, kind="phi3", family="phi3", template="phi3", outtype="f32"):
    """Export a tiny seeded Bunny with the tokenizer; (model, processor as bunny reloads it, llm, mmproj)."""
    tokenizer = spm_tokenizer(tmp_path / "tok", kind)
    text = tiny_text_config(family, len(tokenizer) + PAD_ROWS, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = BunnyConfig(vision_config=tiny_vision_config("siglip"), text_config=text,
                         projector_type="mlp2x_gelu", template=template)
    torch.manual_seed(5)
    model = BunnyForConditionalGeneration(config).eval()
    src = save_pretrained(model, BunnyProcessor.from_config(config, tokenizer, tiny_image_processor("siglip")),
                          tmp_path / FOLDER[kind])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Metaspace warning, tested on its own
        llm, mmproj = export_gguf(src, tmp_path / "gguf", outtype=outtype)
    model, processor = load_pretrained(src)
    return model, processor, llm, mmproj


@pytest.mark.parametrize("kind", ["phi3", "phi3-json", "llama2", "llama2-noprefix"])
def test_llamacpp_tokenizes_and_detokenizes_as_transformers(tmp_path, kind):
    llama2 = kind.startswith("llama2")
    _, processor, path, _ = _bunny(tmp_path, kind, template="minicpm" if llama2 else "phi3")
    tok = processor.tokenizer
    llm = load_llm(path, vocab_only=True)
    meta = llm.metadata
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.add_space_prefix"] == str(kind != "llama2-noprefix").lower()
    assert meta["general.name"] == GGUF_NAME[kind]  # without it llama.cpp would strip (or fail to load)
    pieces = tok.convert_ids_to_tokens(tok(" ".join(PLAIN_TEXTS)).input_ids)
    assert {"<0xE6>", "<0x00>"} <= set(pieces) and "▁the" in pieces  # byte fallback and merges exercised
    published = spm_tokenizer(tmp_path / "published", kind, as_written=True)
    texts = PLAIN_TEXTS + LEADING_SPACE + (SPECIAL_TEXTS[-2:] if llama2 else SPECIAL_TEXTS)
    for text in texts:
        want = tok(text).input_ids
        got = llm.tokenize(text.encode(), add_bos=True, special=True)
        if kind != "llama2-noprefix":
            assert got == published(text).input_ids, text  # the published tokenizer.json, exactly
        assert (got == want) == (text not in DIFFERS[kind]), (text, tok.convert_ids_to_tokens(want))
        assert llm.detokenize(want, special=True).decode() == tok.decode(want), text
        assert detokenize(llm, want[1:]) == tok.decode(want[1:]), text  # no BOS: the first space dropped


def test_token_types_and_stripping_in_llamacpp(tmp_path):
    _, processor, path, _ = _bunny(tmp_path)
    tok = processor.tokenizer
    llm = load_llm(path, vocab_only=True)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    attr = {t: llama_cpp.llama_vocab_get_attr(vocab, tok.convert_tokens_to_ids(t)) for t in
            ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|end|>", "<0x41>", "▁the"]}
    assert attr["<unk>"] == llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    assert attr["<s>"] == attr["<|endoftext|>"] == llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    assert attr["<|end|>"] == llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
    # Phi-3's </s> is not special (user-defined); llama.cpp adds control to any end-of-generation text.
    assert attr["</s>"] == (llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED | llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
                            | llama_cpp.LLAMA_TOKEN_ATTR_CONTROL)
    assert attr["<0x41>"] == llama_cpp.LLAMA_TOKEN_ATTR_BYTE and attr["▁the"] == llama_cpp.LLAMA_TOKEN_ATTR_NORMAL
    assert llama_cpp.llama_vocab_get_attr(vocab, len(tok)) == llama_cpp.LLAMA_TOKEN_ATTR_UNUSED  # padding rows
    assert (llm.token_bos(), llm.token_eos()) == (tok.bos_token_id, tok.eos_token_id)
    # The template's end of answer (<|endoftext|>, also EOS here) ends generation.
    assert llama_cpp.llama_vocab_is_eog(vocab, tok.convert_tokens_to_ids("<|endoftext|>"))


def test_metaspace_tokenizers_warn_where_llamacpp_differs(tmp_path):
    phi3 = spm_tokenizer(tmp_path / "p", "phi3")
    with pytest.warns(UserWarning, match="starts with a space, and text right after a special token"):
        sentencepiece_vocab(phi3, len(phi3))
    with pytest.warns(UserWarning, match="prepend_scheme 'always'"):
        sentencepiece_vocab(spm_tokenizer(tmp_path / "l", "llama2"), len(phi3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sentencepiece_vocab(spm_tokenizer(tmp_path / "j", "phi3-json"), len(phi3))


@pytest.mark.parametrize("family,kind,template", [("phi3", "phi3", "phi3"), ("llama", "llama2", "minicpm")])
def test_spm_llms_give_transformers_logits_in_llamacpp(tmp_path, family, kind, template):
    model, processor, path, _ = _bunny(tmp_path, kind, family, template)
    llm = load_llm(path)
    ids = processor.tokenizer(PLAIN_TEXTS[-1] + " " + PLAIN_TEXTS[2]).input_ids
    got = text_logits(llm, ids)
    with torch.no_grad():
        want = model.language_model(torch.tensor([ids])).logits[0].numpy()
    assert got.shape == want.shape == (len(ids), len(processor.tokenizer) + PAD_ROWS)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_spm_bunny_exports_llm_and_mmproj_for_llamacpp(tmp_path):
    model, processor, path, mmproj = _bunny(tmp_path)
    llm = load_llm(path, logits_all=False)
    # The prompt bunny renders tokenizes alike (text chunks around the image, as mtmd splits it).
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True)
    for i, chunk in enumerate(prompt.split("<image>")):
        assert llm.tokenize(chunk.encode(), add_bos=i == 0, special=True) == \
            processor.tokenizer(chunk, add_special_tokens=i == 0).input_ids
    image = random_image(7, (28, 28))
    got = image_embeddings(llm, mmproj, np.asarray(image))
    with torch.no_grad():
        want = model.get_image_features(processor(text=["<image>"], images=[image])["pixel_values"])[0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)  # llama.cpp's tanh GELU


def _split_a_group(merges):
    """Move the second merge giving some entry to the end: its entry's merges are no longer adjacent."""
    at = next(i for i in range(1, len(merges)) if "".join(merges[i]) == "".join(merges[i - 1]))
    return merges[:at] + merges[at + 1:] + [merges[at]]


def _edit(tok, **changes):
    data = json.loads(tok.backend_tokenizer.to_str())
    for key, value in changes.items():
        if key == "added":
            data["added_tokens"] = [dict(t, **value.get(t["content"], {})) for t in data["added_tokens"]]
        elif key == "vocab":
            data["model"]["vocab"] = value(data["model"]["vocab"])
        elif key == "merges":
            data["model"]["merges"] = value(data["model"]["merges"])
        else:
            data[key] = value
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("changes,message", [
    # merges of a BPE trained without SentencePiece's rule: llama.cpp would merge other pairs
    ({"merges": lambda m: m[:3] + m[4:]}, "is not a merge"),
    ({"merges": lambda m: _split_a_group(m)}, "not adjacent in rank"),
    ({"vocab": lambda v: {k: i for k, i in v.items() if k != "<0x41>"}}, "without the byte tokens <0x41>"),
    ({"normalizer": None, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                                            "split": True}}, "does not split"),
    ({"decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}}, "decoder"),
    ({"added": {"<|user|>": {"lstrip": True}}}, "strip whitespace on their left"),
    ({"added": {"<|endoftext|>": {"rstrip": True}}}, "only as for Phi-3"),
])
def test_tokenizers_llamacpp_cannot_express_are_refused(tmp_path, changes, message):
    tok = spm_tokenizer(tmp_path, "phi3-json")
    check_tokenizer(tok)
    with pytest.raises(BunnyError, match=message):
        check_tokenizer(_edit(tok, **changes))


def test_general_name_marks_phi3_stripping_only_where_the_tokenizer_strips(tmp_path):
    phi3 = spm_tokenizer(tmp_path / "p", "phi3")
    assert gguf_name("Bunny-v1_1-4B", phi3) == "Bunny-v1_1-4B-phi3"
    assert gguf_name("bunny-phi-3-mini", phi3) == "bunny-phi-3-mini"
    assert gguf_name("Bunny-Phi-3-smollm", tiny_tokenizer()) == "Bunny-Phi_3-smollm"
    assert gguf_name("llama2", spm_tokenizer(tmp_path / "l", "llama2")) == "llama2"
