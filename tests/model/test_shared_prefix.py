"""Prefill with shared starts (several questions about one image) equals the plain prefill."""
import pytest
import torch

from bunny.model.generation import SamplingSettings, generate_ids, iter_tokens
from bunny.model.shared_prefix import common_start, plan_groups, prefill_shared
from bunny.testing import make_tiny_bunny, random_image


def _ask(processor, text, n_images=1):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}])


def _batch(processor):
    """Three questions about image A, one about B, two about A+C, one text-only, one
    question about A asked twice (identical prompts)."""
    a, b, c = random_image(1), random_image(2), random_image(3)
    prompts = [
        (_ask(processor, "What colour is it?"), [a]),
        (_ask(processor, "Is there a red circle in the picture?"), [a]),
        (_ask(processor, "How many?"), [b]),
        (_ask(processor, "Where is the square?"), [a]),
        (_ask(processor, "Compare them.", 2), [a, c]),
        (processor.apply_chat_template([{"role": "user", "content": "Tell me about shapes"}]), []),
        (_ask(processor, "Which one is larger?", 2), [a, c]),
        (_ask(processor, "What colour is it?"), [a]),
    ]
    return processor(text=[p for p, _ in prompts], images=[i for _, i in prompts], padding_side="left")


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_shared_prefill_matches_plain(family):
    model, processor = make_tiny_bunny(family, "siglip", seed=4)
    inputs = _batch(processor)
    settings = SamplingSettings(max_new_tokens=6)
    plain = generate_ids(model, inputs, settings, [])
    shared = generate_ids(model, inputs, settings, [], share_prefix=True)
    assert shared == plain
    # Logits, not only the greedy picks: the same up to float rounding.
    with torch.inference_mode():
        out, mask = prefill_shared(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        first = next(iter_tokens(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                 SamplingSettings(max_new_tokens=1), []))
        ref = model(**inputs).logits[:, -1]
    torch.testing.assert_close(out.logits[:, -1], ref, atol=1e-4, rtol=1e-4)
    assert first.tolist() == ref.argmax(-1).tolist()
    assert mask.shape[0] == inputs["input_ids"].shape[0]


def test_plan_groups_cuts_before_last_token_and_outside_images():
    img = 9
    rows = [[5, img, img, img, img, 7, 8, 1], [5, img, img, img, img, 7, 3], [5, img, img, img, img, 6]]
    keys = [b"a", b"a", b"b"]
    group_of, start = plan_groups(rows, keys, image_token=img, per_image=4)
    assert group_of == [0, 0, 1]
    assert start[0] == 6  # 5, four image tokens, 7
    assert start[1] == 5  # one row alone: everything but its last token
    # A shared start that would end inside an image is cut back to before the image.
    group_of, start = plan_groups([[5, img, img, img, img, 1], [5, img, img, img, img, 2]], [b"x", b"x"],
                                  image_token=img, per_image=2)
    assert start == [5]
    _, start = plan_groups([[5, img, img, 1], [5, img, img]], [b"x", b"x"], image_token=img, per_image=2)
    assert start == [1]  # the shorter row keeps its last (image) token, so the image stays out


def test_common_start():
    assert common_start([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_start([[1], [2]]) == 0
    assert common_start([[1, 2]]) == 2


def test_identical_images_in_different_files_share():
    """Grouping is by pixels, not by file name: the same picture twice is one group."""
    model, processor = make_tiny_bunny("llama", "siglip", seed=5)
    prompts = [_ask(processor, "What colour?"), _ask(processor, "What shape?")]
    inputs = processor(text=prompts, images=[[random_image(7)], [random_image(7)]], padding_side="left")
    rows = [r[m.bool()].tolist() for r, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    keys = [inputs["pixel_values"][i:i + 1].numpy().tobytes() for i in range(2)]
    group_of, _ = plan_groups(rows, keys, model.config.image_token_index, model.config.image_seq_length)
    assert group_of == [0, 0]
