"""image_token_pool: k x k average pooling of patch tokens before the projector."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bunny.errors import BunnyError
from bunny.model.modeling import pool_tokens
from bunny.testing import make_tiny_bunny, random_image


def test_pool_tokens_golden():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # 4x4 grid, row-major
    assert pool_tokens(x, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(BunnyError, match="not a square grid divisible by 3"):
        pool_tokens(x, 3)


def test_pooled_model_counts_tokens_and_projects_the_mean(tmp_path):
    # tiny SigLIP: 28 px / 14 px patches = 2x2 grid -> 1 token with k = 2
    model, processor = make_tiny_bunny(seed=1, image_token_pool=2)
    assert model.config.image_seq_length == 1 and processor.image_seq_length == 1
    pixels = torch.randn(2, 3, 28, 28)
    feats = model._tower_features(pixels)
    expected = model.mm_projector(feats.mean(1, keepdim=True))
    torch.testing.assert_close(model.get_image_features(pixels), expected)
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat?"}])
    inputs = processor(text=[prompt], images=[random_image()])
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 1
    model(**inputs)
    model.save_pretrained(tmp_path)
    from bunny.model.modeling import BunnyForConditionalGeneration

    assert BunnyForConditionalGeneration.from_pretrained(tmp_path).config.image_token_pool == 2


def test_pool_refused_where_it_cannot_apply():
    with pytest.raises(BunnyError, match="image_token_pool=3 needs a square grid"):
        make_tiny_bunny(image_token_pool=3)
    with pytest.raises(BunnyError, match="CLS"):
        make_tiny_bunny(tower="clip", image_token_pool=2, vision_feature_select="full")
    with pytest.raises(BunnyError, match=">= 1"):
        make_tiny_bunny(image_token_pool=0)
    from bunny.convert.export_mmproj import check_mmproj_exportable
    from bunny.convert.llava_hf import check_exportable

    config = make_tiny_bunny(image_token_pool=2)[0].config
    with pytest.raises(BunnyError, match="image_token_pool"):
        check_exportable(config)
    with pytest.raises(BunnyError, match="image_token_pool"):
        check_mmproj_exportable(config)
