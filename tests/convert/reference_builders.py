"""Tiny checkpoints in every reference (BAAI Bunny) layout, written the way the reference's
training script writes them, plus the tensors the reference would compute with ("truth").

Everything is seeded. The tower folder (`mm_vision_tower`) is a tiny full SigLIP (image and
text model, `model_type` siglip), laid out as google/siglip-so400m-patch14-384 is; its vision
model keeps the pooling head (`vision_use_head`, the default). Checkpoints hold the tower as
the reference's transformers-4 module tree names it:
`model.vision_tower.vision_tower.vision_model.{embeddings,encoder,post_layernorm,head}.*`.
LLMs are tiny llama / qwen2 (tied embeddings) / phi3 / phi with padded vocabularies (8 rows
beyond the tokenizer, cut on load as the reference does).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM, CLIPConfig, CLIPModel, CLIPVisionModel, SiglipConfig, SiglipModel, SiglipVisionModel,
)

from bunny.testing import tiny_image_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config

MODEL_TYPE = {"llama": "bunny-llama", "qwen2": "bunny-qwen2", "phi3": "bunny-phi3", "phi": "bunny-phi"}
# Llama-3 and Phi-3 tokenizers add a BOS; Phi-2's (GPT-2 style) and Qwen1.5's do not.
BOS = {"llama": True, "qwen2": False, "phi3": True, "phi": False}
TIED = {"qwen2": True}
LORA_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
LORA_R, LORA_ALPHA = 4, 8
PAD_ROWS = 8
# Where the reference's checkpoints keep the tower: its wrapper's `vision_tower`, then the
# transformers-4 SiglipVisionModel's `vision_model`.
TOWER_KEY_PREFIX = "model.vision_tower.vision_tower.vision_model."
TINY_SIGLIP_TEXT = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                        vocab_size=64, max_position_embeddings=16)


@dataclass
class Truth:
    folder: Path
    llm: torch.nn.Module  # final LLM as the reference holds it (LoRA merged, vocabulary cut)
    tower: torch.nn.Module
    projector: dict  # our names: 0.weight, 0.bias, 2.weight, 2.bias
    tokenizer: object
    image_processor: object
    base: Path | None = None
    s2_scales: list[int] | None = None  # set for S2 checkpoints (use_s2)


def _randn(*shape, gen):
    return torch.randn(*shape, generator=gen) * 0.2


def save_tower(root: Path, seed: int = 1, image_size: int = 28, patch_size: int = 14) -> tuple[Path, torch.nn.Module]:
    """A full SigLIP folder (as the hub's so400m); returns it and its vision model."""
    vision_config = tiny_vision_config("siglip", image_size=image_size, patch_size=patch_size).to_dict()
    torch.manual_seed(seed)
    full = SiglipModel(SiglipConfig(vision_config=vision_config, text_config=TINY_SIGLIP_TEXT)).eval()
    folder = root / "siglip-tiny"
    full.save_pretrained(folder)
    tiny_image_processor("siglip", image_size=image_size).save_pretrained(folder)
    tower = SiglipVisionModel(full.config.vision_config).eval()
    tower.load_state_dict(full.vision_model.state_dict())
    assert tower.config.vision_use_head and any(k.startswith("head.") for k in tower.state_dict())
    return folder, tower


def save_clip_tower(root: Path, seed: int = 1) -> tuple[Path, torch.nn.Module]:
    """A full CLIP folder (as openai/clip-vit-large-patch14-336); returns it and its vision model."""
    torch.manual_seed(seed)
    config = CLIPConfig(vision_config=tiny_vision_config("clip").to_dict(), text_config=TINY_SIGLIP_TEXT,
                        projection_dim=16)
    full = CLIPModel(config).eval()
    folder = root / "clip-tiny"
    full.save_pretrained(folder)
    tiny_image_processor("clip").save_pretrained(folder)
    tower = CLIPVisionModel(full.config.vision_config).eval()
    tower.load_state_dict(full.vision_model.state_dict())
    return folder, tower


def tower_keys(state: dict, prefix: str = TOWER_KEY_PREFIX) -> dict:
    """A tower's tensors under the names the reference's checkpoints give them."""
    return {prefix + k: v for k, v in state.items()}


def make_llm(family: str, seed: int):
    tokenizer = tiny_tokenizer(bos=BOS[family])
    config = tiny_text_config(family, len(tokenizer) + PAD_ROWS, bos_token_id=1, eos_token_id=2,
                              tie_word_embeddings=TIED.get(family, False))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def cut_vocab(llm, n: int):
    llm = copy.deepcopy(llm)
    llm.resize_token_embeddings(n)
    return llm


def llm_state(llm) -> dict:
    """The LLM's tensors as HF saves them: a tied head is stored once, as the embeddings."""
    state = {k: v.detach().clone().contiguous() for k, v in llm.state_dict().items()}
    if llm.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def projector_state(seed: int, mm_hidden: int = 24, hidden: int = 32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"0.weight": _randn(hidden, mm_hidden, gen=gen), "0.bias": _randn(hidden, gen=gen),
            "2.weight": _randn(hidden, hidden, gen=gen), "2.bias": _randn(hidden, gen=gen)}


def perturbed(module, seed: int) -> dict:
    """The module's tensors plus noise: weights that must (or must not) be the ones used."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + _randn(*v.shape, gen=gen)).contiguous() for k, v in module.state_dict().items()}


def reference_config(llm, family: str, tower: Path | str, **flags) -> dict:
    config = llm.config.to_dict()
    config.update(
        model_type=MODEL_TYPE[family], architectures=["Bunny" + family.capitalize() + "ForCausalLM"],
        mm_vision_tower=str(tower), mm_projector_type="mlp2x_gelu", mm_hidden_size=24, use_mm_proj=True,
        image_aspect_ratio="pad", tokenizer_padding_side="right", tokenizer_model_max_length=2048,
        tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False, mm_projector_lr=None, use_s2=False,
        unfreeze_vision_tower=False,
    )
    config.update(flags)
    return config


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def save_shards(folder: Path, state: dict, count: int = 2) -> None:
    """Safetensors shards and their index, as HF writes large models."""
    keys = sorted(state)
    shards = {f"model-{i + 1:05d}-of-{count:05d}.safetensors": keys[i::count] for i in range(count)}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(folder / name))
    write_json(folder / "model.safetensors.index.json",
               {"metadata": {}, "weight_map": {k: n for n, names in shards.items() for k in names}})


def save_base(root: Path, family: str, seed: int):
    llm, tokenizer = make_llm(family, seed)
    base = root / f"base-{family}"
    llm.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base, llm, tokenizer


def build_stage1(root: Path, family: str = "llama") -> Truth:
    tower_dir, tower = save_tower(root)
    base, llm, tokenizer = save_base(root, family, seed=2)
    folder = root / "bunny-stage1"
    write_json(folder / "config.json", reference_config(
        llm, family, tower_dir, _name_or_path=str(base), tune_mm_mlp_adapter=True, image_aspect_ratio="square"))
    proj = projector_state(3)
    torch.save({"model.mm_projector." + k: v for k, v in proj.items()}, folder / "mm_projector.bin")
    return Truth(folder, cut_vocab(llm, len(tokenizer)), tower, proj, tokenizer, tiny_image_processor("siglip"), base)


def build_lora(root: Path, family: str = "llama", unfreeze: bool = False) -> Truth:
    from peft import LoraConfig, get_peft_model

    tower_dir, tower = save_tower(root)
    base, llm, tokenizer = save_base(root, family, seed=4)
    folder = root / "bunny-lora"
    lora_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS[family],
                             lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(llm), lora_config)
    gen = torch.Generator().manual_seed(5)
    merged = copy.deepcopy(llm)
    merged_modules = dict(merged.named_modules())
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            with torch.no_grad():
                a.copy_(_randn(*a.shape, gen=gen))
                b.copy_(_randn(*b.shape, gen=gen))  # PEFT starts B at zero: a no-op merge would prove nothing
                target = merged_modules[name.removeprefix("base_model.model.")]
                target.weight += (LORA_ALPHA / LORA_R) * b @ a  # W <- W + (alpha/r) B A, by hand
    peft_model.save_pretrained(folder)
    write_json(folder / "config.json", reference_config(llm, family, tower_dir, _name_or_path=str(base),
                                                        unfreeze_vision_tower=unfreeze))
    proj = projector_state(6)
    extra = {"base_model.model.model.mm_projector." + k: v for k, v in proj.items()}
    if unfreeze:
        trained = perturbed(tower, 7)
        extra |= tower_keys(trained, "base_model.model." + TOWER_KEY_PREFIX)
        tower = copy.deepcopy(tower)
        tower.load_state_dict(trained)
    torch.save(extra, folder / "non_lora_trainables.bin")
    return Truth(folder, cut_vocab(merged, len(tokenizer)), tower, proj, tokenizer, tiny_image_processor("siglip"), base)


def build_merged(root: Path, family: str = "llama", unfreeze: bool = False, fmt: str = "safetensors",
                 hub: bool = False, relative_tower: bool = False, tower_kind: str = "siglip") -> Truth:
    tower_dir, tower = save_clip_tower(root) if tower_kind == "clip" else save_tower(root)
    llm, tokenizer = make_llm(family, seed=8)
    folder = root / "bunny-merged"
    folder.mkdir()
    tower_ref = Path("..") / tower_dir.name if relative_tower else tower_dir
    write_json(folder / "config.json", reference_config(llm, family, tower_ref, _name_or_path="/nowhere/trained",
                                                        unfreeze_vision_tower=unfreeze))
    tokenizer.save_pretrained(folder)
    proj = projector_state(9)
    # The trainer saves the whole model, tower included, frozen or not.
    tower_in_ckpt = perturbed(tower, 10)
    state = llm_state(llm) | {"model.mm_projector." + k: v for k, v in proj.items()}
    state |= tower_keys(tower_in_ckpt)
    if unfreeze:
        tower = copy.deepcopy(tower)
        tower.load_state_dict(tower_in_ckpt)
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_shards(folder, state)
    if hub:  # the published layout ships remote code; it must never run
        cfg = json.loads((folder / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": f"modeling_{MODEL_TYPE[family].replace('-', '_')}.Model"}
        write_json(folder / "config.json", cfg)
        (folder / f"modeling_{MODEL_TYPE[family].replace('-', '_')}.py").write_text(
            "raise RuntimeError('remote code must never run')\n")
    return Truth(folder, cut_vocab(llm, len(tokenizer)), tower, proj, tokenizer, tiny_image_processor(tower_kind))
