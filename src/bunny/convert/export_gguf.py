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

from bunny.atomic import atomic_update, check_output_folder
from bunny.convert.gguf_chat import chat_template, stop_token_id
from bunny.convert.gguf_llm import add_llm_metadata, check_llm_exportable, llm_tensors
from bunny.convert.gguf_tokenizer import add_tokenizer, check_tokenizer, gguf_name
from bunny.errors import BunnyError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# bf16 and q8_0 (llama.cpp's 8-bit type: blocks of 32 values sharing one f16 scale) apply to the
# LLM's matrices, as llama.cpp's own converter writes them; norms and biases stay f32, and the
# mmproj file stays f32 (it runs once per image, so its size costs no decoding time). bf16 keeps a
# bf16 checkpoint's weights exactly (f16 would round them again and clip their range).
Q8_0_BLOCK = 32
# outtype -> the GGML type of the LLM's matrices, packed by gguf from float32 arrays
_PACKED = {"bf16": "BF16", "q8_0": "Q8_0"}


def write_llm_gguf(model, tokenizer, path: Path, outtype: str = "f16", name: str = "bunny",
                   template: str = "bunny") -> Path:
    import gguf

    fam = check_llm_exportable(model.config.text_config)
    llm = model.language_model
    lcfg = llm.config
    packed = getattr(gguf.GGMLQuantizationType, _PACKED[outtype]) if outtype in _PACKED else None
    tensors = llm_tensors(llm, "f32" if packed else outtype)  # before the writer: a failure leaves no file
    jinja = chat_template(template, tokenizer)
    eot = stop_token_id(template, tokenizer)
    writer = gguf.GGUFWriter(str(path), fam.arch)
    writer.add_name(gguf_name(name, tokenizer))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    add_llm_metadata(writer, lcfg)
    add_tokenizer(writer, tokenizer, lcfg.vocab_size, jinja)
    if eot is not None:
        writer.add_eot_token_id(eot)
    for key, array in tensors.items():
        if packed is not None and array.ndim == 2:
            writer.add_tensor(key, gguf.quants.quantize(array, packed), raw_dtype=packed)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def check_q8_0(language_model) -> None:
    """q8_0 needs every matrix's rows to be whole blocks of 32: refuse naming the first that is not."""
    for name, p in language_model.named_parameters():
        if p.ndim == 2 and p.shape[1] % Q8_0_BLOCK:
            raise BunnyError(f"--outtype q8_0: {name} has rows of {p.shape[1]} values, not a multiple of "
                             f"{Q8_0_BLOCK}; export this model as f16 or f32")


def export_gguf(model_path: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16") -> tuple[Path, Path]:
    """Write OUT/model-<outtype>.gguf (the LLM) and OUT/mmproj-model-<outtype>.gguf (tower + projector)
    atomically; other files in OUT (another outtype's export, the model itself) stay."""
    from bunny.convert.export_mmproj import check_mmproj_exportable, write_mmproj_gguf
    from bunny.model.loading import load_pretrained

    if outtype not in OUTTYPES:
        raise BunnyError(f"outtype {outtype!r} is not valid; choose one of {', '.join(OUTTYPES)}")
    check_output_folder(out)
    model, processor = load_pretrained(model_path, dtype=torch.float32)
    # Every check before anything is written.
    check_mmproj_exportable(model.config)
    check_llm_exportable(model.config.text_config)
    check_tokenizer(processor.tokenizer)
    if outtype == "q8_0":
        check_q8_0(model.language_model)
    out = Path(out)
    with atomic_update(out) as tmp:
        name = Path(model_path).name
        write_llm_gguf(model, processor.tokenizer, tmp / f"model-{outtype}.gguf", outtype, name, processor.template)
        write_mmproj_gguf(model, processor.image_processor, tmp / f"mmproj-model-{outtype}.gguf",
                          "f32" if outtype in _PACKED else outtype, name)
    return out / f"model-{outtype}.gguf", out / f"mmproj-model-{outtype}.gguf"
