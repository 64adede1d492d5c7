"""The remaining tower kind (EVA02-CLIP through timm) and LLM families (Phi, StableLM)
go through the same composition path as the others."""
import pytest
import torch

from bunny.model.config import BunnyConfig
from bunny.model.modeling import BunnyForConditionalGeneration
from bunny.model.processor import BunnyProcessor
from bunny.model.timm_tower import TimmVisionConfig
from bunny.model.towers import select_features
from bunny.testing import make_tiny_bunny, random_image, tiny_image_processor, tiny_text_config, tiny_tokenizer


def _eva_config():
    return TimmVisionConfig(architecture="eva02_large_patch14_clip_336", hidden_size=32, image_size=28, patch_size=14,
                            model_kwargs=dict(depth=3, num_heads=4, mlp_ratio=2.0))


def test_eva02_clip_tower_drops_cls_and_uses_block_before_last():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = BunnyConfig(vision_config=_eva_config(), text_config=tiny_text_config("llama", len(tokenizer)))
    assert config.vision_feature_select == "patch" and config.image_seq_length == 4
    model = BunnyForConditionalGeneration(config).eval()
    processor = BunnyProcessor.from_config(config, tokenizer, tiny_image_processor("clip"))
    inputs = processor(text="<image>\nWhat is it?", images=[random_image(0)])
    out = model(**inputs)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1]
    # The features are the output of the block before last, CLS removed: recompute by hand.
    eva = model.vision_tower.model
    x, rope = eva._pos_embed(eva.patch_embed(inputs["pixel_values"]))
    x = eva.norm_pre(x)
    for block in eva.blocks[:-1]:
        x = block(x, rope=rope)
    with torch.no_grad():
        ours = select_features(model.vision_tower(inputs["pixel_values"]).hidden_states, -2, "patch")
    torch.testing.assert_close(ours, x[:, 1:].detach())


@pytest.mark.parametrize("family", ["phi", "stablelm"])
def test_more_llm_families(family):
    model, processor = make_tiny_bunny(family, "clip")
    inputs = processor(text="<image>\nWhat is it?", images=[random_image(0)])
    labels = inputs["input_ids"].clone()
    labels[:, :-2] = -100
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)
