"""Bunny -> GGUF for llama.cpp (and so Ollama): the LLM as one file, the tower + projector
as an mmproj file (bunny.convert.export_mmproj), written with the `gguf` package.

The LLM file follows llama.cpp's conventions for the `llama` architecture (SmolLM2, Llama,
and other Llama-shaped LLMs): its tensor names (`blk.N.attn_q.weight`, ...), its metadata
keys (`llama.*`, `tokenizer.ggml.*`), and the row permutation of the q/k projections that
llama.cpp's rotary embedding expects (transformers rotates the two halves of each head;
llama.cpp rotates adjacent pairs). Other LLM architectures fail with a clear error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from bunny.atomic import atomic_folder
from bunny.errors import BunnyError

SUPPORTED_LLMS = ("llama",)
OUTTYPES = ("f32", "f16")
# llama.cpp names its pre-tokenizer regexes; identified here from tokenizer.json's
# pre_tokenizer (llama.cpp's own converter hashes sample encodings instead).
_PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt2",
    ("Digits", "ByteLevel"): "smollm",  # SmolLM/SmolLM2: single digits, then GPT-2's regex
}


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' half-split rotary layout -> llama.cpp's interleaved one (rows of each head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _np(t: torch.Tensor, outtype: str) -> np.ndarray:
    # 1-D tensors (norms, biases) stay float32 as llama.cpp's converter keeps them.
    dtype = np.float16 if outtype == "f16" and t.ndim >= 2 else np.float32
    return t.detach().float().cpu().numpy().astype(dtype)


def check_llm_exportable(text_config) -> None:
    kind = text_config.model_type
    if kind not in SUPPORTED_LLMS:
        raise BunnyError(f"cannot export the LLM to GGUF: architecture {kind!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_LLMS)}); use llama.cpp's convert_hf_to_gguf.py "
                         "on an `bunny export llava-hf` output's language model instead")
    rope = getattr(text_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise BunnyError(f"cannot export the LLM to GGUF: rope scaling {rope.get('rope_type')!r} is not supported")
    if getattr(text_config, "mlp_bias", False):
        raise BunnyError("cannot export the LLM to GGUF: MLP biases are not supported")


def llm_tensors(language_model, outtype: str) -> dict[str, np.ndarray]:
    """llama.cpp name -> array, for a transformers Llama-architecture causal LM."""
    cfg = language_model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    state = language_model.state_dict()
    out = {"token_embd.weight": _np(state["model.embed_tokens.weight"], outtype),
           "output_norm.weight": _np(state["model.norm.weight"], outtype)}
    if not cfg.tie_word_embeddings:  # llama.cpp reuses token_embd when output.weight is absent
        out["output.weight"] = _np(state["lm_head.weight"], outtype)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf, ours in names.items():
            for part in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{part}"
                if key not in state:
                    continue
                t = state[key]
                if hf == "self_attn.q_proj":
                    t = permute_rope(t, n_head)
                elif hf == "self_attn.k_proj":
                    t = permute_rope(t, n_kv)
                out[f"blk.{i}.{ours}.{part}"] = _np(t, outtype)
    return out


def _pre_tokenizer(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    key = tuple(s.get("type") for s in steps)
    if key in _PRE_TOKENIZERS and all(s.get("use_regex", True) for s in steps if s.get("type") == "ByteLevel") \
            and all(s.get("individual_digits", True) for s in steps if s.get("type") == "Digits"):
        return _PRE_TOKENIZERS[key]
    raise BunnyError(f"cannot export the tokenizer to GGUF: its pre-tokenizer {json.dumps(pre)[:200]} has no "
                     f"llama.cpp equivalent known to bunny (known: byte-level BPE as in GPT-2 and SmolLM2)")


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` tokenizer model."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise BunnyError(f"cannot export the tokenizer to GGUF: model {data['model']['type']!r} (only BPE is supported)")
    pre = _pre_tokenizer(data)
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):  # rows past the tokenizer (padded vocabularies) become unused tokens
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(3 if i in special else 4 if i in added else 1 if i in by_id else 5)  # CONTROL/USER/NORMAL/UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))


def write_llm_gguf(model, tokenizer, path: Path, outtype: str = "f16", name: str = "bunny") -> Path:
    import gguf

    cfg = model.config.text_config
    check_llm_exportable(cfg)
    llm = model.language_model
    lcfg = llm.config
    tensors = llm_tensors(llm, outtype)  # before the writer: a failure leaves no file
    head_dim = getattr(lcfg, "head_dim", None) or lcfg.hidden_size // lcfg.num_attention_heads
    rope_theta = (getattr(lcfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(lcfg, "rope_theta", 10000.0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(lcfg.max_position_embeddings)
    writer.add_embedding_length(lcfg.hidden_size)
    writer.add_block_count(lcfg.num_hidden_layers)
    writer.add_feed_forward_length(lcfg.intermediate_size)
    writer.add_head_count(lcfg.num_attention_heads)
    writer.add_head_count_kv(lcfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(lcfg.rms_norm_eps)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_vocab_size(lcfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    add_tokenizer(writer, tokenizer, lcfg.vocab_size)
    for key, array in tensors.items():
        writer.add_tensor(key, array)
    _finish(writer)
    return path


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(model_path: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16") -> tuple[Path, Path]:
    """Write OUT/model-<outtype>.gguf (the LLM) and OUT/mmproj-model-<outtype>.gguf (tower + projector)."""
    from bunny.convert.export_mmproj import check_mmproj_exportable, write_mmproj_gguf
    from bunny.model.loading import load_pretrained

    if outtype not in OUTTYPES:
        raise BunnyError(f"outtype {outtype!r} is not valid; choose one of {', '.join(OUTTYPES)}")
    model, processor = load_pretrained(model_path, dtype=torch.float32)
    check_mmproj_exportable(model.config)  # fail before writing anything
    check_llm_exportable(model.config.text_config)
    out = Path(out)
    with atomic_folder(out) as tmp:
        name = Path(model_path).name
        write_llm_gguf(model, processor.tokenizer, tmp / f"model-{outtype}.gguf", outtype, name)
        write_mmproj_gguf(model, processor.image_processor, tmp / f"mmproj-model-{outtype}.gguf", outtype, name)
    return out / f"model-{outtype}.gguf", out / f"mmproj-model-{outtype}.gguf"
