"""The vision tower + projector as a llama.cpp mmproj GGUF (`clip` architecture, LLaVA-style
`mlp` projector), as llama.cpp's clip/mtmd loader reads it.

Only the blocks up to the feature layer are written (hidden_states[-2] -> all blocks but
the last), `clip.vision.block_count` is that count k, and `clip.vision.feature_layer = [k]`
tells llama.cpp's LLaVA graph (tools/mtmd/models/llava.cpp) to run all k blocks and take
their output: without the key it runs `block_count - 1` blocks, the LLaVA default for files
that hold the whole tower. The final post-layernorm is left out. Tensor names are the gguf
package's `v.*` / `mm.*` names (fc1 -> ffn_up, fc2 -> ffn_down).

CLIP towers are refused: llama.cpp's LLaVA graph appends CLIP's class token after the
patches, gives the tokens positions in that order and then drops the first token as if it
were the class token, so its features are not the tower's (the patch tokens come out
shifted by one, with the class token last).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bunny.errors import BunnyError

TOWERS = ("siglip_vision_model",)
FEATURE_LAYER_KEY = "clip.vision.feature_layer"  # llama.cpp's key; the gguf package has no constant for it
# transformers' activation names that llama.cpp's `clip.use_gelu` computes (tanh-approximated GELU).
_GELU = ("gelu_pytorch_tanh", "gelu_new")
_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
          "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}


def check_mmproj_exportable(config) -> None:
    reasons = []
    if config.s2_scales:
        reasons.append("S2 multi-scale features (llama.cpp's LLaVA encoder runs one scale)")
    if config.projector_type != "mlp2x_gelu":
        reasons.append(f"projector {config.projector_type!r} (only mlp2x_gelu maps to llama.cpp's 'mlp')")
    if getattr(config, "image_token_pool", 1) > 1:
        reasons.append(f"image_token_pool {config.image_token_pool} (llama.cpp's 'mlp' projects every patch token)")
    kind = config.vision_config.model_type
    if kind == "clip_vision_model":
        reasons.append("a CLIP tower (llama.cpp's LLaVA graph puts CLIP's class token after the patches and then "
                       "drops the first token, so the image features would be shifted by one patch)")
    elif kind not in TOWERS:
        reasons.append(f"tower type {kind!r} (supported: {', '.join(TOWERS)})")
    else:
        if config.vision_feature_select != "full":
            reasons.append("SigLIP with vision_feature_select 'patch' (llama.cpp keeps every SigLIP token)")
        if config.vision_config.hidden_act not in _GELU:
            reasons.append(f"tower activation {config.vision_config.hidden_act!r} (llama.cpp's SigLIP runs "
                           "tanh-approximated GELU)")
    if reasons:
        raise BunnyError("cannot export the vision tower to a GGUF mmproj: " + "; ".join(reasons))


def feature_block_count(vision_config, layer: int) -> int:
    """Blocks run before the features are taken: hidden_states[k] is the output of block k-1."""
    n = vision_config.num_hidden_layers
    k = layer if layer >= 0 else n + 1 + layer
    if not 1 <= k <= n:
        raise BunnyError(f"vision_feature_layer {layer} selects no encoder block of a {n}-layer tower")
    return k


def _np(t, outtype: str, conv: bool = False) -> np.ndarray:
    t = t.detach().float().cpu().numpy()
    # llama.cpp's converter stores matrices (and the patch convolution) in f16 for f16 files.
    return t.astype(np.float16 if outtype == "f16" and (t.ndim == 2 or conv) else np.float32)


def mmproj_tensors(model, outtype: str) -> dict[str, np.ndarray]:
    cfg = model.config
    tower = model.vision_tower
    state = tower.state_dict()
    blocks = feature_block_count(cfg.vision_config, cfg.vision_feature_layer)
    out = {"v.patch_embd.weight": _np(state["embeddings.patch_embedding.weight"], outtype, conv=True),
           "v.position_embd.weight": _np(state["embeddings.position_embedding.weight"], outtype)}
    if "embeddings.patch_embedding.bias" in state:
        out["v.patch_embd.bias"] = _np(state["embeddings.patch_embedding.bias"], outtype)
    for i in range(blocks):
        for hf, ours in _BLOCK.items():
            for part in ("weight", "bias"):
                out[f"v.blk.{i}.{ours}.{part}"] = _np(state[f"encoder.layers.{i}.{hf}.{part}"], outtype)
    for j in (0, 2):  # Linear -> GELU -> Linear
        for part in ("weight", "bias"):
            out[f"mm.{j}.{part}"] = _np(getattr(model.mm_projector[j], part), outtype)
    return out


def write_mmproj_gguf(model, image_processor, path: Path, outtype: str = "f16", name: str = "bunny") -> Path:
    import gguf
    from gguf.constants import Keys

    cfg = model.config
    check_mmproj_exportable(cfg)
    vc = cfg.vision_config
    tensors = mmproj_tensors(model, outtype)
    vision = Keys.ClipVision
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(name)
    writer.add_description("image encoder for LLaVA-style models (exported by bunny)")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_bool(Keys.Clip.HAS_VISION_ENCODER, True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool(Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_string(Keys.Clip.PROJECTOR_TYPE, "mlp")
    writer.add_uint32(vision.IMAGE_SIZE, cfg.base_image_size)
    writer.add_uint32(vision.PATCH_SIZE, vc.patch_size)
    writer.add_uint32(vision.EMBEDDING_LENGTH, vc.hidden_size)
    writer.add_uint32(vision.FEED_FORWARD_LENGTH, vc.intermediate_size)
    writer.add_uint32(vision.PROJECTION_DIM, cfg.text_config.hidden_size)
    writer.add_uint32(vision.Attention.HEAD_COUNT, vc.num_attention_heads)
    writer.add_float32(vision.Attention.LAYERNORM_EPS, vc.layer_norm_eps)
    blocks = feature_block_count(vc, cfg.vision_feature_layer)
    writer.add_uint32(vision.BLOCK_COUNT, blocks)
    writer.add_array(FEATURE_LAYER_KEY, [blocks])  # int32 array, as llama.cpp reads it
    writer.add_array(vision.IMAGE_MEAN, [float(x) for x in image_processor.image_mean])
    writer.add_array(vision.IMAGE_STD, [float(x) for x in image_processor.image_std])
    writer.add_bool(vision.USE_GELU, True)  # checked above: a tanh-approximated GELU
    for key, array in tensors.items():
        writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
