"""Bunny -> GGUF for llama.cpp (and so Ollama): the LLM as one file, the tower + projector
as an mmproj file (bunny.convert.export_mmproj), written with the `gguf` package.

The LLM file follows llama.cpp's conventions for its architecture (bunny.convert.gguf_llm:
llama, qwen2, phi3, phi2, stablelm): tensor names (`blk.N.attn_q.weight`, ...), metadata
keys (`<arch>.*`, `tokenizer.ggml.*`), the tokenizer (byte-level BPE with llama.cpp's name for
its pre-tokenizer, or SentencePiece-style as llama.cpp's `llama` model) and bunny's chat
template as Jinja (bunny.convert.gguf_tokenizer, gguf_sentencepiece, gguf_chat).
Anything llama.cpp cannot express fails with the reason before a file is written.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from bunny.atomic import atomic_folder
from bunny.convert.gguf_chat import chat_template, stop_token_id
from bunny.convert.gguf_llm import add_llm_metadata, check_llm_exportable, llm_tensors
from bunny.convert.gguf_tokenizer import add_tokenizer, check_tokenizer, gguf_name
from bunny.errors import BunnyError

OUTTYPES = ("f32", "f16")


def write_llm_gguf(model, tokenizer, path: Path, outtype: str = "f16", name: str = "bunny",
                   template: str = "bunny") -> Path:
    import gguf

    fam = check_llm_exportable(model.config.text_config)
    llm = model.language_model
    lcfg = llm.config
    tensors = llm_tensors(llm, outtype)  # before the writer: a failure leaves no file
    jinja = chat_template(template, tokenizer)
    eot = stop_token_id(template, tokenizer)
    writer = gguf.GGUFWriter(str(path), fam.arch)
    writer.add_name(gguf_name(name, tokenizer))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    add_llm_metadata(writer, lcfg)
    add_tokenizer(writer, tokenizer, lcfg.vocab_size, jinja)
    if eot is not None:
        writer.add_eot_token_id(eot)
    for key, array in tensors.items():
        writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export_gguf(model_path: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16") -> tuple[Path, Path]:
    """Write OUT/model-<outtype>.gguf (the LLM) and OUT/mmproj-model-<outtype>.gguf (tower + projector)."""
    from bunny.convert.export_mmproj import check_mmproj_exportable, write_mmproj_gguf
    from bunny.model.loading import load_pretrained

    if outtype not in OUTTYPES:
        raise BunnyError(f"outtype {outtype!r} is not valid; choose one of {', '.join(OUTTYPES)}")
    model, processor = load_pretrained(model_path, dtype=torch.float32)
    # Every check before anything is written.
    check_mmproj_exportable(model.config)
    check_llm_exportable(model.config.text_config)
    check_tokenizer(processor.tokenizer)
    out = Path(out)
    with atomic_folder(out) as tmp:
        name = Path(model_path).name
        write_llm_gguf(model, processor.tokenizer, tmp / f"model-{outtype}.gguf", outtype, name, processor.template)
        write_mmproj_gguf(model, processor.image_processor, tmp / f"mmproj-model-{outtype}.gguf", outtype, name)
    return out / f"model-{outtype}.gguf", out / f"mmproj-model-{outtype}.gguf"
