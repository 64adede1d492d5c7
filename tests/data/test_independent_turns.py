"""Independent turns: each QA pair of a sample trained as if it were the only one, behind
the shared system prompt and image tokens. Parity: the packed sample's per-answer loss and
logits equal those of each pair rendered and run alone."""
from __future__ import annotations

import pytest
import torch

from bunny.data.collate import collate, real_tokens
from bunny.data.llava import IGNORE_INDEX, Conversation, ConversationDataset, tokenize_conversation, \
    tokenize_independent_turns
from bunny.errors import BunnyError
from bunny.testing import make_tiny_bunny, random_image

PAIRS = [("What color is the square?", "red"), ("Is there a circle?", "yes"), ("How many squares?", "2")]


def conv_of(pairs, sample_id="s", image="img.png"):
    turns = []
    for k, (q, a) in enumerate(pairs):
        turns += [("user", ("<image>\n" if k == 0 else "") + q), ("assistant", a)]
    return Conversation(sample_id, turns, [image])


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny_bunny(seed=3)
    return model, processor


def test_layout_prefix_once_then_each_pair(tiny):
    _, processor = tiny
    ids, labels, segments, positions = tokenize_independent_turns(conv_of(PAIRS), processor, "bunny")
    singles = [tokenize_conversation(conv_of([p]), processor, "bunny") for p in PAIRS]
    shared = segments.count(0)
    assert processor.image_token_index in ids[:shared] and processor.image_token_index not in ids[shared:]
    assert all(l == IGNORE_INDEX for l in labels[:shared])
    for k, (s_ids, s_labels) in enumerate(singles):
        where = [i for i, s in enumerate(segments) if s == k + 1]
        assert [ids[i] for i in where] == s_ids[shared:]
        assert [labels[i] for i in where] == s_labels[shared:]
        assert [positions[i] for i in where] == list(range(shared, len(s_ids)))
    assert len(ids) == shared + sum(len(s) - shared for s, _ in singles)


def test_packed_logits_equal_each_pair_alone(tiny, tmp_path):
    model, processor = tiny
    image = tmp_path / "img.png"
    random_image(1, (28, 28)).save(image)
    packed = ConversationDataset([conv_of(PAIRS, image=str(image))], processor, "bunny", "pad", independent_turns=True)
    alone = ConversationDataset([conv_of([p], image=str(image)) for p in PAIRS], processor, "bunny", "pad")
    # two packed samples of different lengths in one batch: padding must not leak either
    short = ConversationDataset([conv_of(PAIRS[:1], "t", str(image))], processor, "bunny", "pad", independent_turns=True)
    batch = collate([packed[0], short[0]], processor.pad_token_id)
    assert batch["attention_mask"].shape[:2] == (2, 1)
    assert real_tokens(batch) == len(packed[0]["input_ids"]) + len(short[0]["input_ids"])
    with torch.no_grad():
        out = model(**batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        seg = packed[0]["segment_ids"]
        for k in range(len(PAIRS)):
            single = collate([alone[k]], processor.pad_token_id)
            ref = model(**{k2: v for k2, v in single.items() if k2 != "labels"}).logits[0]
            shared = int((seg == 0).sum())
            mine = torch.cat([logits[0, :shared], logits[0, seg == k + 1]])
            torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
        # the loss is the mean over all answers, each as if alone
        singles = [model(**collate([alone[k]], processor.pad_token_id)) for k in range(len(PAIRS))]
        n = [int((alone[k]["labels"][1:] != IGNORE_INDEX).sum()) for k in range(len(PAIRS))]
        expected = sum(s.loss * c for s, c in zip(singles, n)) / sum(n)
        only_packed = model(**collate([packed[0]], processor.pad_token_id)).loss
    torch.testing.assert_close(only_packed, expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.loss)


def test_eager_attention_gets_an_additive_mask(tiny, tmp_path):
    model, processor = tiny
    image = tmp_path / "img.png"
    random_image(1, (28, 28)).save(image)
    packed = ConversationDataset([conv_of(PAIRS, image=str(image))], processor, "bunny", "pad", independent_turns=True)
    batch = {k: v for k, v in collate([packed[0]], processor.pad_token_id).items() if k != "labels"}
    impl = model.language_model.config._attn_implementation
    try:
        with torch.no_grad():
            model.language_model.config._attn_implementation = "sdpa"
            a = model(**batch).logits
            model.language_model.config._attn_implementation = "eager"
            b = model(**batch).logits
    finally:
        model.language_model.config._attn_implementation = impl
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_errors_and_truncation(tiny):
    _, processor = tiny
    late = Conversation("late", [("user", "Hi"), ("assistant", "yes"), ("user", "<image>\nAnd?"), ("assistant", "no")],
                        ["img.png"])
    with pytest.raises(BunnyError, match="late.*start of the first question"):
        tokenize_independent_turns(late, processor, "bunny")
    full = tokenize_independent_turns(conv_of(PAIRS), processor, "bunny")
    one = len(tokenize_conversation(conv_of(PAIRS[:1]), processor, "bunny")[0])
    cut = tokenize_independent_turns(conv_of(PAIRS), processor, "bunny", max_length=one + 1)
    assert max(cut[2]) == 1 and len(full[0]) > len(cut[0])  # whole pairs dropped from the end
    with pytest.raises(BunnyError, match="first question alone"):
        tokenize_independent_turns(conv_of(PAIRS), processor, "bunny", max_length=one - 1)
