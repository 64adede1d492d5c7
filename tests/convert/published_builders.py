"""Tiny seeded checkpoints in the layouts BAAI published on the hub (the trust_remote_code
models), written with the config.json keys each published model has.

Where the keys come from: the published config.json of Bunny-v1_0-3B, Bunny-v1_0-4B,
Bunny-v1_1-4B and Bunny-Llama-3-8B-V (read on the hub). Bunny-v1_1-4B's `use_s2: true` is
inferred: its file is 31 bytes longer than v1_0-4B's, which is the longer mm_vision_tower
path (14) plus one `"use_s2": true,` line (17). Bunny-v1_0-2B-zh and Bunny-v1_1-Llama-3-8B-V:
their config.json was not found; the keys are those the reference's training script writes
for such a run (2B-zh: LoRA on Qwen1.5-1.8B with a frozen tower, as BAAI's
bunny-qwen1.5-1.8b-siglip-lora config; v1.1-Llama-3-8B-V: S2 and an unfrozen tower, as its
model card's 1152x1152 resolution says).

Every published folder holds: config.json (the LLM's transformers-4 config plus the Bunny
keys, `auto_map` naming the shipped remote code), generation_config.json, the tokenizer,
safetensors (shards with an index; v1_0-2B-zh one model.safetensors) holding the LLM,
`model.mm_projector.*` and the tower (`model.vision_tower.vision_tower.vision_model.*`), and
the shipped `configuration_bunny_*.py` / `modeling_bunny_*.py`, which raise if anything
imports them. The tower in the files is whole (27 layers, post_layernorm, pooling head) in
the models with an unfrozen tower; v1_0-3B and v1_0-2B-zh hold their frozen tower without
its last encoder layer and head. That is what the published sizes say: v1_0-4B's index is
72.6 kB and Llama-3-8B-V's 80.2 kB, as with a whole tower (72.58 / 80.19 computed), v1_0-3B's
88.7 kB as without those keys (88.73; 91.96 with them), and v1_0-2B-zh's 4.48 GB file holds
~30M parameters fewer than a whole tower would.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from bunny.testing import tiny_image_processor, tiny_tokenizer

from reference_builders import (
    BOS, MODEL_TYPE, PAD_ROWS, Truth, cut_vocab, llm_state, perturbed, projector_state, save_shards, save_tower,
    tower_keys, write_json,
)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# Each family's transformers-4 config keys, as the published files have them (sizes shrunk).
# Token ids are the tiny tokenizer's: 0 <|endoftext|>, 1 <s>, 4 <|end_of_text|>. Phi-2's
# partial_rotary_factor is 0.4 of an 80-wide head (32 rotary dims); the tiny 8-wide head needs
# an even count, so 0.5.
LLM_CONFIG = {
    "phi": dict(hidden_act="gelu_new", layer_norm_eps=1e-05, partial_rotary_factor=0.5, qk_layernorm=False,
                resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, rope_theta=10000.0, rope_scaling=None,
                num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "phi3": dict(hidden_act="silu", rms_norm_eps=1e-05, rope_theta=10000.0, rope_scaling=None,
                 original_max_position_embeddings=4096, max_position_embeddings=4096, sliding_window=2047,
                 embd_pdrop=0.0, resid_pdrop=0.0, attention_dropout=0.0, num_key_value_heads=4,
                 bos_token_id=1, eos_token_id=0, pad_token_id=0),
    "qwen2": dict(hidden_act="silu", rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=32768,
                  use_sliding_window=False, max_window_layers=2, max_position_embeddings=32768, attention_dropout=0.0,
                  num_key_value_heads=4, bos_token_id=0, eos_token_id=0),
    "llama": dict(hidden_act="silu", rms_norm_eps=1e-05, rope_theta=500000.0, rope_scaling=None, attention_bias=False,
                  attention_dropout=0.0, pretraining_tp=1, num_key_value_heads=2, max_position_embeddings=8192,
                  bos_token_id=1, eos_token_id=4),
}
ARCHITECTURE = {"phi": "BunnyPhi", "phi3": "BunnyPhi3", "qwen2": "BunnyQwen2", "llama": "BunnyLlama"}
S2_TOWER = dict(image_size=384, patch_size=48)  # the reference's default scales 384,768,1152 need a 384 tower


@dataclass(frozen=True)
class Published:
    family: str  # the LLM family (bunny.testing names)
    unfreeze: bool | None  # unfreeze_vision_tower; None: the key is absent
    s2: bool | None  # use_s2; None: the key is absent
    projector_lr: float
    max_length: int  # tokenizer_model_max_length
    tower: str = "google/siglip-so400m-patch14-384"  # the published mm_vision_tower
    extra_code: tuple[str, ...] = ()  # other remote-code files the folder ships
    truncated_tower: bool = False  # the files lack the tower's last encoder layer and head
    one_file: bool = False  # model.safetensors instead of shards + index


PUBLISHED = {
    "Bunny-v1_0-3B": Published("phi", None, None, 2e-05, 2048, truncated_tower=True),
    "Bunny-v1_0-4B": Published("phi3", True, None, 2e-05, 4096),
    "Bunny-v1_1-4B": Published("phi3", True, True, 2e-05, 4096, tower="/share/bunny/models/siglip-so400m-patch14-384"),
    "Bunny-v1_0-2B-zh": Published("qwen2", None, None, 2e-05, 2048, truncated_tower=True, one_file=True,
                                  extra_code=("tokenization_bunny_qwen2.py", "tokenization_bunny_qwen2_fast.py")),
    "Bunny-Llama-3-8B-V": Published("llama", True, None, 1e-05, 2048),
    "Bunny-v1_1-Llama-3-8B-V": Published("llama", True, True, 1e-05, 2048),
}


def published_config(name: str, spec: Published, llm_fields: dict, tower: str, mm_hidden: int) -> dict:
    code = MODEL_TYPE[spec.family].replace("-", "_")
    arch = ARCHITECTURE[spec.family]
    config = dict(
        _name_or_path=f"BAAI/{name}", architectures=[f"{arch}ForCausalLM"],
        auto_map={"AutoConfig": f"configuration_{code}.{arch}Config",
                  "AutoModelForCausalLM": f"modeling_{code}.{arch}ForCausalLM"},
        model_type=MODEL_TYPE[spec.family], **llm_fields, initializer_range=0.02, tie_word_embeddings=False,
        use_cache=True, torch_dtype="float16", transformers_version="4.40.0",
        freeze_mm_mlp_adapter=False, image_aspect_ratio="pad", mm_hidden_size=mm_hidden,
        mm_projector_lr=spec.projector_lr, mm_projector_type="mlp2x_gelu", mm_vision_tower=tower,
        tokenizer_model_max_length=spec.max_length, tokenizer_padding_side="right", tune_mm_mlp_adapter=False,
        use_mm_proj=True,
    )
    if spec.unfreeze is not None:
        config["unfreeze_vision_tower"] = spec.unfreeze
    if spec.s2 is not None:
        config["use_s2"] = spec.s2
    return dict(sorted(config.items()))


def build_published(root: Path, name: str, tower_ref: str | None = None) -> Truth:
    """The published layout of `name` (a PUBLISHED key), tiny and seeded.

    tower_ref: what config.json's mm_vision_tower names; default the tiny tower's folder
    (the published value, a hub id or a path on the authors' machine, is `PUBLISHED[name].tower`).
    """
    spec = PUBLISHED[name]
    tower_dir, tower = save_tower(root, **(S2_TOWER if spec.s2 else {}))
    tokenizer = tiny_tokenizer(bos=BOS[spec.family])
    llm_fields = dict(TINY, **LLM_CONFIG[spec.family], vocab_size=len(tokenizer) + PAD_ROWS)
    llm_config = AutoConfig.for_model(spec.family, **llm_fields, tie_word_embeddings=False)
    torch.manual_seed(11)
    llm = AutoModelForCausalLM.from_config(llm_config).eval()
    scales = [384, 768, 1152] if spec.s2 else None
    mm_hidden = tower.config.hidden_size * (len(scales) if scales else 1)

    folder = root / name
    folder.mkdir()
    write_json(folder / "config.json",
               published_config(name, spec, llm_fields, tower_ref or str(tower_dir), mm_hidden))
    write_json(folder / "generation_config.json",
               {k: llm_fields[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in llm_fields}
               | {"_from_model_config": True, "transformers_version": "4.40.0"})
    tokenizer.save_pretrained(folder)
    proj = projector_state(12, mm_hidden=mm_hidden)
    # The files hold the trained tower when unfrozen, else the hub's own (maybe truncated).
    in_ckpt = perturbed(tower, 13) if spec.unfreeze else {k: v.clone() for k, v in tower.state_dict().items()}
    if spec.truncated_tower:
        dropped = ("head.", f"encoder.layers.{tower.config.num_hidden_layers - 1}.")
        in_ckpt = {k: v for k, v in in_ckpt.items() if not k.startswith(dropped)}
    state = llm_state(llm) | {"model.mm_projector." + k: v for k, v in proj.items()} | tower_keys(in_ckpt)
    if spec.one_file:
        save_file(state, str(folder / "model.safetensors"))
    else:
        save_shards(folder, state)
    for file in (f"configuration_{MODEL_TYPE[spec.family].replace('-', '_')}.py",
                 f"modeling_{MODEL_TYPE[spec.family].replace('-', '_')}.py", *spec.extra_code):
        (folder / file).write_text(f"raise RuntimeError('remote code {file} must never run')\n")
    if spec.unfreeze:
        tower = copy.deepcopy(tower)
        tower.load_state_dict(in_ckpt)
    processor = tiny_image_processor("siglip", image_size=max(scales) if scales else tower.config.image_size)
    return Truth(folder, cut_vocab(llm, len(tokenizer)), tower, proj, tokenizer, processor, s2_scales=scales)
