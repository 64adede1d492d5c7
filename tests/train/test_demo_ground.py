"""The demo's word-grounded projector start: the linear map is installed exactly, and the
targets name each patch's object."""
from __future__ import annotations

import pytest
import torch

from bunny.errors import BunnyError
from bunny.model.projectors import build_projector
from bunny.train.demo_ground import install_linear, patch_targets


def test_installed_map_is_exact():
    torch.manual_seed(0)
    proj = build_projector("mlp2x_gelu", 6, 16)
    w, b = torch.randn(6, 16), torch.randn(16)
    install_linear(proj, w, b)
    x = torch.randn(50, 6) * 5
    torch.testing.assert_close(proj(x), x @ w + b, rtol=1e-5, atol=1e-5)
    # and it still trains: every installed weight gets a gradient
    proj(x).sum().backward()
    assert proj[0].weight.grad[:12].abs().sum() > 0 and proj[2].weight.grad[:, :12].abs().sum() > 0


def test_too_narrow_projector_is_refused():
    proj = build_projector("mlp2x_gelu", 6, 10)  # needs 12 hidden units
    with pytest.raises(BunnyError, match="cannot hold"):
        install_linear(proj, torch.zeros(6, 10), torch.zeros(10))


def test_patch_targets_sum_colour_and_shape_words():
    """Class ids as `scene_batch` gives them (0 background, k + 1 = k-th colour/shape):
    background patches get zero, object patches their colour word + shape word."""
    embed = torch.arange(40, dtype=torch.float32).view(10, 4)
    colour_table = torch.cat([torch.zeros(1, 4), embed[[1, 3]]])  # red, blue
    shape_table = torch.cat([torch.zeros(1, 4), embed[[2, 4]]])  # circle, square
    out = patch_targets(colour_table, shape_table, torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 2, 1]))
    torch.testing.assert_close(out[0], torch.zeros(4))
    torch.testing.assert_close(out[1], embed[1] + embed[2])
    torch.testing.assert_close(out[2], embed[3] + embed[4])
    torch.testing.assert_close(out[3], out[1])


@pytest.mark.slow
def test_fit_on_the_real_llm_and_shipped_tower():
    """SmolLM2's embeddings and the shipped tower: the map explains most of the targets and
    puts almost every object patch nearest its own colour and shape words (held-out scenes)."""
    from bunny.model.loading import DEFAULT_TOWER, build_model
    from bunny.train.demo_ground import fit_word_projector

    model, proc = build_model("smollm2-135m", tower=DEFAULT_TOWER, projector_type="mlp2x_gelu", template="bunny")
    fit = fit_word_projector(model, proc.tokenizer, n_images=128)
    assert fit["r2"] > 0.85 and fit["object_patch_words_right"] > 0.9, fit


@pytest.mark.slow
def test_word_alignment_tells_a_word_fit_projector_from_a_random_one():
    """word_alignment measures any projector the way the fit reports its own; a random
    projector's tokens are near chance (1/6 colour, 1/4 shape, 1/24 both)."""
    from bunny.model.loading import DEFAULT_TOWER, build_model
    from bunny.train.demo_ground import fit_word_projector, word_alignment

    torch.manual_seed(0)
    model, proc = build_model("smollm2-135m", tower=DEFAULT_TOWER, projector_type="mlp2x_gelu", template="bunny")
    random = word_alignment(model, proc.tokenizer)
    assert random["colour"] < 0.4 and random["shape"] < 0.45 and random["both"] < 0.15, random
    fit = fit_word_projector(model, proc.tokenizer, n_images=128)
    fitted = word_alignment(model, proc.tokenizer)
    assert fitted["both"] == fit["object_patch_words_right"] > 0.9, (fitted, fit)
    assert fitted["colour"] >= fitted["both"] and fitted["shape"] >= fitted["both"]


def test_patch_targets_with_position_words_and_background_word():
    embed = torch.arange(40, dtype=torch.float32).view(10, 4)
    colour_table = torch.cat([torch.zeros(1, 4), embed[[1]]])
    shape_table = torch.cat([torch.zeros(1, 4), embed[[2]]])
    position_table = torch.cat([torch.zeros(1, 4), embed[[5]]])
    out = patch_targets(colour_table, shape_table, torch.tensor([0, 1]), torch.tensor([0, 1]),
                        position_table, torch.tensor([0, 1]), background=embed[9])
    torch.testing.assert_close(out[0], embed[9])
    torch.testing.assert_close(out[1], embed[1] + embed[2] + embed[5])


def test_token_labels_of_pooled_blocks():
    """A 4x4 patch grid pooled 2x2: a block of one object (with background) is pure and
    keeps the object's classes; a block showing two different pairs is mixed."""
    from bunny.train.demo_ground import token_labels

    colour = torch.tensor([[1, 1, 0, 2,
                            0, 1, 3, 0,
                            0, 0, 0, 0,
                            0, 0, 0, 4]])
    shape = colour.clone()
    c, s, pure = token_labels(colour, shape, 2)
    assert c.tolist() == [1, 3, 0, 4] and s.tolist() == [1, 3, 0, 4]
    assert pure.tolist() == [True, False, True, True]
    c1, _, pure1 = token_labels(colour, shape, 1)
    assert c1.tolist() == colour.flatten().tolist() and pure1.all()


def test_word_split_by_the_tokenizer_is_refused():
    from bunny.train.demo_ground import word_ids

    class Split:  # one token per character, as a tokenizer without the word would split it
        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [ord(c) for c in text]})()

    with pytest.raises(BunnyError, match="word 'greenish' is 9 tokens"):
        word_ids(Split(), ["greenish"])


def test_position_word_weight_scales_only_the_position_word():
    embed = torch.arange(40, dtype=torch.float32).view(10, 4)
    tables = [torch.cat([torch.zeros(1, 4), embed[[k]]]) for k in (1, 2, 5)]
    out = patch_targets(tables[0], tables[1], torch.tensor([0, 1]), torch.tensor([0, 1]), tables[2],
                        torch.tensor([0, 1]), position_weight=0.5)
    torch.testing.assert_close(out[0], torch.zeros(4))
    torch.testing.assert_close(out[1], embed[1] + embed[2] + 0.5 * embed[5])


@pytest.mark.parametrize("kw,match", [({"position_weight": 0.0}, "position weight must be positive"),
                                      ({"scale": -1.0}, "scale must be positive")])
def test_fit_refuses_non_positive_weights(kw, match):
    from bunny.testing import make_tiny_bunny
    from bunny.train.demo_ground import fit_word_projector

    model, proc = make_tiny_bunny()
    with pytest.raises(BunnyError, match=match):
        fit_word_projector(model, proc.tokenizer, **kw)
