"""The LLM of a Bunny as llama.cpp's GGUF: one table entry per transformers model type.

Each entry names llama.cpp's architecture, how its norms work (RMSNorm or LayerNorm with
bias), the activation llama.cpp hard-codes for it, whether q/k rows need llama.cpp's
interleaved rotary layout (the `llama` architecture rotates adjacent pairs; the others use
NEOX rotation, the two halves of each head as transformers does) and the transformers ->
llama.cpp tensor names inside a block. Metadata keys are `<arch>.*` as llama.cpp reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bunny.errors import BunnyError

_LLAMA_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


@dataclass(frozen=True)
class Family:
    arch: str                      # llama.cpp's architecture name
    norm: str                      # "rms" or "layer" (LayerNorm with bias)
    activation: tuple[str, ...]    # transformers hidden_act values matching llama.cpp's fixed activation
    block: dict[str, str]
    final_norm: str = "model.norm"
    permute_qk: bool = False
    output_required: bool = False  # llama.cpp needs output.weight even when tied
    checks: dict[str, object] = field(default_factory=dict)  # config attribute -> the only value llama.cpp expresses


FAMILIES = {
    "llama": Family("llama", "rms", ("silu",), _LLAMA_BLOCK, permute_qk=True, checks={"mlp_bias": False}),
    "qwen2": Family("qwen2", "rms", ("silu",), _LLAMA_BLOCK, checks={"use_sliding_window": False}),
    "phi3": Family("phi3", "rms", ("silu",), {
        "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}),
    "phi": Family("phi2", "layer", ("gelu_new", "gelu_pytorch_tanh"), {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.dense": "attn_output", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down", "input_layernorm": "attn_norm"},
        final_norm="model.final_layernorm", output_required=True, checks={"qk_layernorm": False}),
    "stablelm": Family("stablelm", "layer", ("silu",), _LLAMA_BLOCK, output_required=True,
                       checks={"qk_layernorm": False, "use_parallel_residual": False}),
}
# What to use for the families bunny loads but llama.cpp cannot take from this exporter.
ALTERNATIVES = ("convert the LLM with llama.cpp's convert_hf_to_gguf.py "
                "(from a `bunny export llava-hf` output's language model)")


def family_of(text_config) -> Family:
    kind = text_config.model_type
    if kind not in FAMILIES:
        raise BunnyError(f"cannot export the LLM to GGUF: LLM family {kind!r} is not supported "
                         f"(supported: {', '.join(FAMILIES)}); {ALTERNATIVES}")
    return FAMILIES[kind]


def rope(text_config) -> dict:
    params = dict(getattr(text_config, "rope_parameters", None) or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in params and getattr(text_config, key, None) is not None:
            params[key] = getattr(text_config, key)
    return params


def head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def check_llm_exportable(text_config) -> Family:
    """The family, or a BunnyError naming what llama.cpp cannot express."""
    fam = family_of(text_config)
    kind = text_config.model_type
    r = rope(text_config)
    if r.get("rope_type", "default") != "default":
        raise BunnyError(f"cannot export the LLM to GGUF: {kind} with rope scaling {r.get('rope_type')!r} "
                         "is not supported")
    if text_config.hidden_act not in fam.activation:
        raise BunnyError(f"cannot export the LLM to GGUF: llama.cpp's {fam.arch} uses {fam.activation[0]}, "
                         f"this {kind} uses {text_config.hidden_act!r}")
    for attr, value in fam.checks.items():
        if getattr(text_config, attr, value) not in (value, None):
            raise BunnyError(f"cannot export the LLM to GGUF: {kind} with {attr}={getattr(text_config, attr)!r} "
                             f"is not supported by llama.cpp's {fam.arch} here; {ALTERNATIVES}")
    rot = head_dim(text_config) * float(r.get("partial_rotary_factor", 1.0))
    if rot != int(rot) or int(rot) % 2:
        raise BunnyError(f"cannot export the LLM to GGUF: {rot} rotary dimensions per head is not an even count")
    return fam


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' half-split rotary layout -> llama.cpp's interleaved one (rows of each head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_numpy(t: torch.Tensor, outtype: str) -> np.ndarray:
    # 1-D tensors (norms, biases) stay float32 as llama.cpp's converter keeps them.
    dtype = np.float16 if outtype == "f16" and t.ndim >= 2 else np.float32
    return t.detach().float().cpu().numpy().astype(dtype)


def llm_tensors(language_model, outtype: str) -> dict[str, np.ndarray]:
    """llama.cpp name -> array for a transformers causal LM of a supported family."""
    cfg = language_model.config
    fam = family_of(cfg)
    state = language_model.state_dict()
    out = {"token_embd.weight": to_numpy(state["model.embed_tokens.weight"], outtype)}
    for part in ("weight", "bias"):
        if f"{fam.final_norm}.{part}" in state:
            out[f"output_norm.{part}"] = to_numpy(state[f"{fam.final_norm}.{part}"], outtype)
    # llama.cpp reuses token_embd when output.weight is absent, except where it requires the head.
    if not cfg.tie_word_embeddings or fam.output_required:
        out["output.weight"] = to_numpy(state["lm_head.weight"], outtype)
    if "lm_head.bias" in state:
        out["output.bias"] = to_numpy(state["lm_head.bias"], outtype)
    used = {"model.embed_tokens.weight", "lm_head.weight", "lm_head.bias",
            f"{fam.final_norm}.weight", f"{fam.final_norm}.bias"}
    for i in range(cfg.num_hidden_layers):
        for hf, ours in fam.block.items():
            for part in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{part}"
                if key not in state:
                    continue
                t = state[key]
                if fam.permute_qk and hf == "self_attn.q_proj":
                    t = permute_rope(t, cfg.num_attention_heads)
                elif fam.permute_qk and hf == "self_attn.k_proj":
                    t = permute_rope(t, cfg.num_key_value_heads)
                out[f"blk.{i}.{ours}.{part}"] = to_numpy(t, outtype)
                used.add(key)
    left = sorted(set(state) - used)
    if left:  # a weight llama.cpp's graph would not use: refuse rather than drop it
        raise BunnyError(f"cannot export the LLM to GGUF: weights with no llama.cpp {fam.arch} tensor: "
                         f"{', '.join(left[:10])}{' ...' if len(left) > 10 else ''}")
    return out


def add_llm_metadata(writer, text_config) -> None:
    fam = family_of(text_config)
    r = rope(text_config)
    writer.add_context_length(text_config.max_position_embeddings)
    writer.add_embedding_length(text_config.hidden_size)
    writer.add_block_count(text_config.num_hidden_layers)
    writer.add_feed_forward_length(text_config.intermediate_size)
    writer.add_head_count(text_config.num_attention_heads)
    writer.add_head_count_kv(getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads)
    writer.add_rope_dimension_count(int(head_dim(text_config) * float(r.get("partial_rotary_factor", 1.0))))
    writer.add_rope_freq_base(float(r.get("rope_theta", 10000.0)))
    if fam.norm == "rms":
        writer.add_layer_norm_rms_eps(text_config.rms_norm_eps)
    else:
        writer.add_layer_norm_eps(text_config.layer_norm_eps)
    writer.add_vocab_size(text_config.vocab_size)
