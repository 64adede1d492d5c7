"""Multimodal sequence packing: samples of different lengths (text and image tokens) share
rows; per-sample losses, logits and gradients equal each sample run alone or padded; no
token attends across samples; positions restart in every sample.

Tolerances: float32 tiny models; packed and padded runs differ only in the order of the
sums inside matrix products, so logits and losses agree to 1e-5 (absolute and relative)
and gradients to 1e-5 absolute / 1e-4 relative.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bunny.data.collate import collate, count_targets, real_tokens
from bunny.data.llava import IGNORE_INDEX, Conversation, ConversationDataset
from bunny.data.packing import attention_layout, check_packable, pack, plan_rows
from bunny.errors import BunnyError
from bunny.testing import make_tiny_bunny, random_image

CLOSE = dict(atol=1e-5, rtol=1e-5)
GRAD_CLOSE = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_bunny(seed=5)


@pytest.fixture(scope="module")
def samples(tiny, tmp_path_factory):
    """Five samples: image + short answer, image + long dialogue, text-only, two images, independent turns off."""
    _, processor = tiny
    folder = tmp_path_factory.mktemp("packing-images")
    paths = []
    for i in range(4):
        paths.append(str(folder / f"{i}.png"))
        random_image(seed=10 + i, size=(28, 28)).save(paths[-1])
    convs = [
        Conversation("short", [("user", "<image>\nWhat color is the square?"), ("assistant", "red")], [paths[0]]),
        Conversation("long", [("user", "<image>\nWhat is in the image?"),
                              ("assistant", "A red circle on the left and two blue squares."),
                              ("user", "How many stars are there?"), ("assistant", "3"),
                              ("user", "Is there a green triangle in the image?"), ("assistant", "Yes.")], [paths[1]]),
        Conversation("text", [("user", "Answer the question."), ("assistant", "No.")], []),
        Conversation("two", [("user", "<image>\n<image>\nIs there a circle?"), ("assistant", "Yes")],
                     [paths[2], paths[3]]),
        Conversation("mid", [("user", "<image>\nHow many squares?"), ("assistant", "It is yellow.")], [paths[3]]),
    ]
    ds = ConversationDataset(convs, processor, "bunny", "pad")
    return [ds[i] for i in range(len(ds))]


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(T,) cross-entropy of predicting labels[t + 1] from logits[t]; 0 where ignored."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="none")


def where_packed(samples: list[dict], capacity: int) -> list[tuple[int, slice]]:
    """(row, span) of each sample in a batch packed into rows of `capacity` tokens."""
    out: list = [None] * len(samples)
    for r, row in enumerate(plan_rows([len(s["input_ids"]) for s in samples], capacity)):
        start = 0
        for i in row:
            n = len(samples[i]["input_ids"])
            out[i] = (r, slice(start, start + n))
            start += n
    return out


PACK_TO = 256


def full_logits(model, batch: dict) -> torch.Tensor:
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# -- the plan --------------------------------------------------------------------------------


def test_plan_rows_golden_values():
    assert plan_rows([5, 3, 3, 2, 7, 1], 8) == [[0, 3], [1, 2, 5], [4]]  # loads 7, 7, 7 (first fit: 8, 8, 5)
    assert plan_rows([4, 4, 4], 4) == [[0], [1], [2]]
    assert plan_rows([1, 1, 1, 1], 100) == [[0, 1, 2, 3]]
    assert plan_rows([6, 5, 4, 3], 9) == [[0, 3], [1, 2]]


@pytest.mark.parametrize("seed", range(5))
def test_plan_rows_fits_everything_once_and_is_deterministic(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 300, (40,), generator=g).tolist()
    rows = plan_rows(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(40))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    assert len(rows) <= -(-sum(lengths) // 512) + 2  # close to the lower bound
    assert plan_rows(lengths, 512) == rows


def test_layout_positions_restart_and_first_tokens_are_not_targets(tiny, samples):
    _, processor = tiny
    batch = collate(samples, processor.pad_token_id, pack_to=PACK_TO)
    lengths = [len(s["input_ids"]) for s in samples]
    n_rows, width = batch["input_ids"].shape
    assert n_rows < len(samples) and width <= PACK_TO
    assert real_tokens(batch) == sum(lengths)
    # the same answer tokens are trained as in the padded batch
    assert count_targets(batch["labels"]) == count_targets(collate(samples, processor.pad_token_id)["labels"])
    for s, (r, span) in zip(samples, where_packed(samples, PACK_TO)):
        assert torch.equal(batch["input_ids"][r, span], s["input_ids"])
        assert torch.equal(batch["position_ids"][r, span], torch.arange(len(s["input_ids"])))
        assert batch["labels"][r, span.start] == IGNORE_INDEX
        assert torch.equal(batch["labels"][r, span][1:], s["labels"][1:])
    # pixel_values follow the placeholders in row order
    order = [i for row in plan_rows(lengths, PACK_TO) for i in row if samples[i]["pixel_values"] is not None]
    assert torch.equal(batch["pixel_values"], torch.cat([samples[i]["pixel_values"] for i in order]))


def test_mask_is_block_diagonal_and_causal():
    s = [{"id": "a", "input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6, 7])},
         {"id": "b", "input_ids": torch.tensor([8, 9]), "labels": torch.tensor([8, 9])},
         {"id": "c", "input_ids": torch.tensor([4]), "labels": torch.tensor([4])}]
    s.append({"id": "d", "input_ids": torch.tensor([3]), "labels": torch.tensor([3])})
    batch = pack(s, 0, 3)  # rows: [a], [b, c], [d] + 2 padding
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 4], [3, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0], [0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100], [-100, -100, -100]]
    assert batch["attention_mask"].int().tolist() == [
        [[[1, 0, 0], [1, 1, 0], [1, 1, 1]]],
        [[[1, 0, 0], [1, 1, 0], [0, 0, 1]]],
        [[[1, 0, 0], [1, 0, 0], [1, 0, 0]]]]  # padding queries see token 0 only (no empty softmax row)
    assert real_tokens(batch) == 7


# -- the model on packed batches ---------------------------------------------------------------


def test_per_sample_logits_and_losses_equal_each_sample_alone(tiny, samples):
    model, processor = tiny
    batch = collate(samples, processor.pad_token_id, pack_to=PACK_TO)
    with torch.no_grad():
        logits = full_logits(model, batch)
        for s, (r, span) in zip(samples, where_packed(samples, PACK_TO)):
            alone = full_logits(model, collate([s], processor.pad_token_id))[0]
            torch.testing.assert_close(logits[r, span], alone, **CLOSE)
            torch.testing.assert_close(per_token_losses(logits[r, span], batch["labels"][r, span]),
                                       per_token_losses(alone, s["labels"]), **CLOSE)
        # the batch loss is the mean over the same answer tokens as the padded batch's
        torch.testing.assert_close(model(**batch).loss, model(**collate(samples, processor.pad_token_id)).loss,
                                   **CLOSE)


def grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_gradients_equal_padded_and_per_sample(tiny, samples):
    model, processor = tiny
    packed = collate(samples, processor.pad_token_id, pack_to=PACK_TO)
    padded = collate(samples, processor.pad_token_id)
    a, b = grads(model, packed), grads(model, padded)
    assert a.keys() == b.keys() and any(n.startswith("mm_projector") for n in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], **GRAD_CLOSE, msg=name)
    # one sample's loss taken inside the packed batch: the gradient of that sample alone
    k = next(i for i, (_, span) in enumerate(where_packed(samples, PACK_TO))
             if span.start > 0 and samples[i]["pixel_values"] is not None)  # behind another sample in its row
    r, span = where_packed(samples, PACK_TO)[k]
    only_k = dict(packed, labels=torch.full_like(packed["labels"], IGNORE_INDEX))
    only_k["labels"][r, span] = packed["labels"][r, span]
    a, b = grads(model, only_k), grads(model, collate([samples[k]], processor.pad_token_id))
    for name in b:
        torch.testing.assert_close(a[name], b[name], **GRAD_CLOSE, msg=name)


def test_no_token_attends_across_samples(tiny, samples):
    """Changing sample A's tokens (text and image) leaves B, packed after A in the same row,
    unchanged; the same change under a plain causal mask over the row does change B, so the
    test has teeth."""
    model, processor = tiny
    pair = [samples[0], samples[4]]  # both with an image
    batch = pack(pair, processor.pad_token_id, PACK_TO)
    assert batch["input_ids"].shape[0] == 1
    b_span = slice(len(pair[0]["input_ids"]), sum(len(s["input_ids"]) for s in pair))
    changed_a = dict(pair[0], input_ids=pair[0]["input_ids"].clone(), pixel_values=-pair[0]["pixel_values"])
    text = (changed_a["input_ids"] != processor.image_token_index).nonzero().squeeze(-1)
    changed_a["input_ids"][text[1:]] = (changed_a["input_ids"][text[1:]] + 7) % 300
    other = pack([changed_a, pair[1]], processor.pad_token_id, PACK_TO)
    with torch.no_grad():
        torch.testing.assert_close(full_logits(model, batch)[0, b_span], full_logits(model, other)[0, b_span],
                                   atol=1e-6, rtol=1e-6)
        leaky = {k: v for k, v in batch.items() if k != "attention_mask"}
        leaky_other = {k: v for k, v in other.items() if k != "attention_mask"}
        for d in (leaky, leaky_other):  # one causal sequence: what packing must not be
            d["attention_mask"] = torch.ones_like(d["input_ids"])
        assert not torch.allclose(full_logits(model, leaky)[0, b_span], full_logits(model, leaky_other)[0, b_span],
                                  atol=1e-3)


def test_positions_restart_in_every_sample(tiny, samples):
    """The LLM's rotary embedding is asked for positions 0, 1, ... in every packed sample
    (rotary attention itself only sees differences of positions, so the logits alone could
    not tell), and sample B's logits equal B alone."""
    model, processor = tiny
    pair = [samples[2], samples[0]]
    batch = pack(pair, processor.pad_token_id, PACK_TO)
    seen = []
    rotary = model.language_model.model.rotary_emb
    hook = rotary.register_forward_hook(lambda mod, args, kwargs, out: seen.append(
        kwargs["position_ids"] if "position_ids" in kwargs else args[1]), with_kwargs=True)
    try:
        with torch.no_grad():
            logits = full_logits(model, batch)
    finally:
        hook.remove()
    lengths = [len(s["input_ids"]) for s in pair]
    assert [p.tolist() for p in seen] == [[list(range(lengths[0])) + list(range(lengths[1]))]]
    b_span = slice(lengths[0], sum(lengths))
    with torch.no_grad():
        alone = full_logits(model, collate([pair[1]], processor.pad_token_id))[0]
    torch.testing.assert_close(logits[0, b_span], alone, **CLOSE)


def test_eager_attention_gives_the_same_logits(tiny, samples):
    model, processor = tiny
    batch = collate(samples, processor.pad_token_id, pack_to=PACK_TO)
    impl = model.language_model.config._attn_implementation
    try:
        with torch.no_grad():
            a = full_logits(model, batch)
            model.language_model.config._attn_implementation = "eager"
            assert attention_layout(model) == "mask"
            b = full_logits(model, batch)
    finally:
        model.language_model.config._attn_implementation = impl
    torch.testing.assert_close(a, b, **CLOSE)


def test_varlen_layout_one_row_no_mask(tiny, samples):
    """The flash-attention layout: one row, no padding, no mask, positions restarting. Run
    here through transformers' SDPA, which reads the same sample boundaries from the position
    ids (flash-attention's variable-length kernel needs a GPU and the flash-attn package)."""
    model, processor = tiny
    batch = collate(samples, processor.pad_token_id, pack_to=PACK_TO, layout="varlen")
    assert batch["position_ids"].tolist() == [[t for s in samples for t in range(len(s["input_ids"]))]]
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(len(s["input_ids"]) for s in samples))
    assert real_tokens(batch) == batch["input_ids"].shape[1]
    with torch.no_grad():
        # without labels (which turn the cache off), a cache would hide the boundaries
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        start = 0
        for s in samples:
            n = len(s["input_ids"])
            alone = full_logits(model, collate([s], processor.pad_token_id))[0]
            torch.testing.assert_close(logits[start:start + n], alone, **CLOSE)
            start += n
        torch.testing.assert_close(model(**batch).loss, model(**collate(samples, processor.pad_token_id)).loss, **CLOSE)


def test_independent_turn_samples_pack_too(tiny, samples, tmp_path):
    model, processor = tiny
    image = tmp_path / "i.png"
    random_image(3, (28, 28)).save(image)
    conv = Conversation("multi", [("user", "<image>\nWhat color is the square?"), ("assistant", "red"),
                                  ("user", "Is there a circle?"), ("assistant", "Yes")], [str(image)])
    turns = ConversationDataset([conv], processor, "bunny", "pad", independent_turns=True)[0]
    group = [samples[2], turns, samples[0]]
    packed = collate(group, processor.pad_token_id, pack_to=PACK_TO)
    padded = collate(group, processor.pad_token_id)  # the 4-D mask of independent turns, one sample a row
    with torch.no_grad():
        a, b = full_logits(model, packed), full_logits(model, padded)
        for i, (r, span) in enumerate(where_packed(group, PACK_TO)):
            torch.testing.assert_close(a[r, span], b[i, :span.stop - span.start], **CLOSE)
        torch.testing.assert_close(model(**packed).loss, model(**padded).loss, **CLOSE)
    with pytest.raises(BunnyError, match="independent-turn.*sdpa or eager"):
        collate(group, processor.pad_token_id, pack_to=PACK_TO, layout="varlen")


# -- bad input -----------------------------------------------------------------------------------


def test_a_sample_longer_than_a_row_is_named_not_cut(tiny, samples):
    _, processor = tiny
    longest = max(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]))
    n = len(samples[longest]["input_ids"])
    with pytest.raises(BunnyError, match=rf"longer than model_max_length {n - 1} .*sample 'long' \(index {longest}\): {n} tokens.*never cuts"):
        collate(samples, processor.pad_token_id, pack_to=n - 1)
    with pytest.raises(BunnyError, match=r"2 sample\(s\).*'a' \(index 0\): 9 tokens, sample 'c' \(index 2\): 8"):
        check_packable([9, 3, 8], ["a", "b", "c"], 7)
    check_packable([7, 1], ["a", "b"], 7)


def test_other_bad_input(tiny):
    model, processor = tiny
    with pytest.raises(BunnyError, match="empty batch"):
        collate([], 0, pack_to=8)
    with pytest.raises(BunnyError, match="layout 'rows'"):
        pack([{"input_ids": torch.tensor([1]), "labels": torch.tensor([1])}], 0, 8, layout="rows")
    with pytest.raises(BunnyError, match="padding_side must be right"):
        collate([{"input_ids": torch.tensor([1]), "labels": torch.tensor([1])}], 0, "left", pack_to=8)
    with pytest.raises(BunnyError, match="capacity must be >= 1"):
        plan_rows([1], 0)
    impl = model.language_model.config._attn_implementation
    try:
        model.language_model.config._attn_implementation = "flash_attention_2"
        assert attention_layout(model) == "varlen"
        model.language_model.config._attn_implementation = "flex_attention"
        with pytest.raises(BunnyError, match="one of sdpa, eager, flash_attention_2.*'flex_attention'"):
            attention_layout(model)
    finally:
        model.language_model.config._attn_implementation = impl
