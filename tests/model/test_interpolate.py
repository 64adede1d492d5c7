import pytest
import torch
import torch.nn.functional as F

from bunny.errors import BunnyError
from bunny.model.config import BunnyConfig
from bunny.model.interpolate import interpolate_tower, set_tower_image_size
from bunny.model.loading import load_pretrained, save_pretrained
from bunny.model.modeling import BunnyForConditionalGeneration
from bunny.model.processor import BunnyProcessor
from bunny.model.towers import build_vision_model
from bunny.testing import random_image, tiny_image_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config


def _tower(kind, seed=0):
    torch.manual_seed(seed)
    return build_vision_model(tiny_vision_config(kind, image_size=28, patch_size=7)).eval()  # 4x4 grid


def _by_hand(weight, old, new, cls):
    """Straightforward re-implementation: each channel is an old x old image, resized bicubically."""
    rows = [weight[0:1]] if cls else []
    grid = weight[int(cls):]
    for_channels = []
    for c in range(grid.shape[1]):
        img = grid[:, c].reshape(1, 1, old, old)
        for_channels.append(F.interpolate(img, size=(new, new), mode="bicubic", align_corners=False).reshape(-1))
    return torch.cat(rows + [torch.stack(for_channels, dim=1)])


@pytest.mark.parametrize("kind,cls", [("siglip", False), ("clip", True)])
def test_interpolated_tower_matches_reimplementation_and_transformers(kind, cls):
    tower = _tower(kind)
    original = _tower(kind)  # same seed: the same weights
    old_weight = tower.embeddings.position_embedding.weight.detach().clone()
    interpolate_tower(tower, 56)  # 4x4 -> 8x8 grid
    new_weight = tower.embeddings.position_embedding.weight
    assert new_weight.shape == (64 + cls, 24)
    torch.testing.assert_close(new_weight, _by_hand(old_weight, 4, 8, cls))
    if cls:
        assert torch.equal(new_weight[0], old_weight[0])  # CLS position kept
    # transformers' on-the-fly interpolation of the original tower gives the same features
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = tower(px, output_hidden_states=True).hidden_states[-2]
        theirs = original(px, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert tower.config.image_size == 56 and ours.shape[1] == 64 + cls


def test_same_size_is_identical():
    tower, original = _tower("siglip"), _tower("siglip")
    interpolate_tower(tower, 28)
    for (k, a), (_, b) in zip(tower.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), k
    px = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(tower(px).last_hidden_state, original(px).last_hidden_state)


def _tiny_bunny(tower="siglip"):
    tok = tiny_tokenizer()
    config = BunnyConfig(vision_config=tiny_vision_config(tower, image_size=28, patch_size=7),
                         text_config=tiny_text_config("llama", len(tok)))
    torch.manual_seed(0)
    model = BunnyForConditionalGeneration(config).eval()
    return model, BunnyProcessor.from_config(config, tok, tiny_image_processor(tower))


@pytest.mark.parametrize("tower,tokens", [("siglip", 64), ("clip", 64)])
def test_model_config_processor_follow_and_round_trip(tmp_path, tower, tokens):
    model, processor = _tiny_bunny(tower)
    assert model.config.image_seq_length == 16
    set_tower_image_size(model, 56, processor)
    assert model.config.vision_config.image_size == 56
    assert model.config.image_seq_length == processor.image_seq_length == tokens
    inputs = processor(text="<image> what is it?", images=[random_image(0)])
    assert inputs["pixel_values"].shape[-2:] == (56, 56)
    with torch.no_grad():
        logits = model(**inputs).logits
    out = save_pretrained(model, processor, tmp_path / "m")
    loaded, loaded_processor = load_pretrained(out)  # strict: the 8x8 table is in the saved config
    assert loaded.config.vision_config.image_size == 56 and loaded_processor.image_seq_length == tokens
    again = loaded_processor(text="<image> what is it?", images=[random_image(0)])
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**again).logits, logits)


def test_bad_sizes_and_s2():
    model, _ = _tiny_bunny()
    with pytest.raises(BunnyError, match="multiple of the tower's patch size 7"):
        set_tower_image_size(model, 50)
    model.config.s2_scales = [28, 56]
    with pytest.raises(BunnyError, match="S2"):
        set_tower_image_size(model, 56)
