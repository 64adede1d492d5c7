"""Tiny, seeded models and tokenizers for tests and benchmarks: no download, seconds to build.

Every LLM family goes through the same composition path; these configs only shrink sizes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from bunny.model.config import BunnyConfig
from bunny.model.modeling import BunnyForConditionalGeneration
from bunny.model.processor import BunnyProcessor

SPECIAL_TOKENS = ["<|endoftext|>", "<s>", "</s>", "<pad>", "<|end_of_text|>"]
_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A red circle on the left and two blue squares.",
    "Is there a green triangle in the image? Yes. No. How many stars are there? 3",
    "Answer the question using a single word or phrase. Answer with the option's letter.",
    "What color is the square? It is yellow, purple, orange, white or black.",
]

LLM_FAMILIES = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
    "phi3": dict(model_type="phi3", num_key_value_heads=2, pad_token_id=3),
    "phi": dict(model_type="phi", num_key_value_heads=4),
    "stablelm": dict(model_type="stablelm", num_key_value_heads=2),
}
TOWERS = {
    "siglip": dict(model_type="siglip_vision_model"),
    "clip": dict(model_type="clip_vision_model", projection_dim=16),
}


def tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on a fixed corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None,
        add_bos_token=bos,
    )


def tiny_text_config(family: str, vocab_size: int, **overrides):
    spec = dict(LLM_FAMILIES[family])
    model_type = spec.pop("model_type")
    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, **spec)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_vision_config(tower: str, image_size: int = 28, patch_size: int = 14):
    spec = dict(TOWERS[tower])
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                                num_attention_heads=4, image_size=image_size, patch_size=patch_size, **spec)


def tiny_image_processor(tower: str, image_size: int = 28):
    if tower == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size})
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def make_tiny_bunny(family: str = "llama", tower: str = "siglip", seed: int = 0, template: str = "bunny",
                    bos: bool = False, projector_type: str = "mlp2x_gelu", **config_kwargs):
    """(model, processor) with random seeded weights; float32, eval mode."""
    tokenizer = tiny_tokenizer(bos=bos)
    text_config = tiny_text_config(family, len(tokenizer), bos_token_id=1, eos_token_id=2)
    config = BunnyConfig(vision_config=tiny_vision_config(tower), text_config=text_config,
                         projector_type=projector_type, template=template, **config_kwargs)
    torch.manual_seed(seed)
    model = BunnyForConditionalGeneration(config).eval()
    processor = BunnyProcessor.from_config(config, tokenizer, tiny_image_processor(tower))
    return model, processor


def tiny_llm(family: str = "llama", seed: int = 0):
    """A tiny plain causal LM and its tokenizer (for composing and reference layouts)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_text_config(family, len(tokenizer), bos_token_id=1, eos_token_id=2))
    return model.eval(), tokenizer


def random_image(seed: int = 0, size: tuple[int, int] = (40, 30)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def save_tiny_bunny(folder: Path, **kwargs) -> Path:
    from bunny.model.loading import save_pretrained

    model, processor = make_tiny_bunny(**kwargs)
    return save_pretrained(model, processor, folder)


def saved_lora_run(recipe: dict, run_dir: Path, seed: int = 5):
    """A LoRA run's folder as training leaves it (`adapter/` + `recipe.yaml`), built from `recipe`
    with its trainable weights moved off their initial values (so a merge has something to
    fold); returns the (model, processor) the adapter was saved from."""
    import yaml

    from bunny.train.parts import build_for_recipe, configure_trainables, save_adapter
    from bunny.train.recipe import Recipe

    model, processor = build_for_recipe(Recipe(**recipe))
    configure_trainables(model, Recipe(**recipe))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    save_adapter(model, Path(run_dir) / "adapter")
    (Path(run_dir) / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return model, processor


def held_out_questions(n: int, seed: int = 0) -> list[tuple]:
    """(image, question) pairs of the synthetic held-out split, whole images, at least n."""
    from bunny.data.synthetic import draw_example
    from bunny.data.synthetic_render import render_scene

    out, index = [], 0
    while len(out) < n:
        scene, qas = draw_example(seed, "eval", index)
        image = render_scene(scene)
        out += [(image, qa["question"]) for qa in qas]
        index += 1
    return out
