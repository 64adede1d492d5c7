"""Running exported GGUF files in llama.cpp through llama-cpp-python's public API."""
from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp import mtmd_cpp

# llama.cpp keeps its KV cache in f16 unless told otherwise; f32 files are compared with an
# f32 cache, so both sides compute in float32 throughout.
KV_TYPES = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}


def load_llm(path: Path, n_ctx: int = 512, logits_all: bool = True, kv: str = "f32", **kwargs) -> Llama:
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, n_threads=2,
                 type_k=KV_TYPES[kv], type_v=KV_TYPES[kv], verbose=False, **kwargs)


def text_logits(llm: Llama, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids` (reset first: eval drops the cache past n_tokens). (T, V)"""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def image_embeddings(llm: Llama, mmproj: Path, rgb: np.ndarray) -> np.ndarray:
    """What llama.cpp's mtmd puts into the LLM for one image (H, W, 3 uint8). (tokens, H_llm)"""
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = False
    params.print_timings = False
    params.n_threads = 2
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    assert ctx is not None, f"llama.cpp could not load {mmproj}"
    h, w, _ = rgb.shape
    data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    bitmap = mtmd_cpp.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    try:
        marker = mtmd_cpp.mtmd_default_marker()
        text = mtmd_cpp.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        images = [mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))]
        images = [c for c in images if mtmd_cpp.mtmd_input_chunk_get_type(c) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        assert len(images) == 1
        assert mtmd_cpp.mtmd_encode_chunk(ctx, images[0]) == 0
        n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(images[0])
        out = np.ctypeslib.as_array(mtmd_cpp.mtmd_get_output_embd(ctx), shape=(n * llm.n_embd(),))
        return out.reshape(n, llm.n_embd()).copy()
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
        mtmd_cpp.mtmd_free(ctx)


def detokenize(llm: Llama, ids: list[int]) -> str:
    """llama.cpp's own detokenizer (as llama-server's), special tokens rendered, none removed."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    size = 16 * len(ids) + 16
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, True)
    assert 0 <= n <= size
    return buf.raw[:n].decode()
