"""LLaVA conversations: loading rules, offset-based labels (golden values), collation, sampling."""
from __future__ import annotations

import json

import pytest
import torch

from bunny.data.collate import collate, count_targets
from bunny.data.llava import (IGNORE_INDEX, Conversation, ConversationDataset, load_conversations,
                              tokenize_conversation)
from bunny.data.sampler import modality_length_grouped_order, shuffled_order
from bunny.errors import BunnyError
from bunny.model.templates import get_template
from bunny.testing import make_tiny_bunny, random_image


@pytest.fixture(scope="module")
def processor():
    return make_tiny_bunny()[1]


def trained_text(processor, labels):
    return processor.tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)


def write(tmp_path, records, name="d.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in records))
    return path


def sample(i="a", image="x.png", turns=("What color?", "red")):
    convs = [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(turns)]
    if image:
        convs[0]["value"] = "<image>\n" + convs[0]["value"]
    return {"id": i, **({"image": image} if image else {}), "conversations": convs}


# -- labels: golden values -------------------------------------------------------------------

def test_bunny_template_trains_answers_and_sep2_only(processor):
    conv = Conversation("s", [("user", "<image>\nWhat color is the square?"), ("assistant", "red"),
                              ("user", "Is there a circle?"), ("assistant", "Yes.")], ["x.png"])
    ids, labels = tokenize_conversation(conv, processor, "bunny")
    assert ids == processor.tokenize(get_template("bunny").render(conv.turns))
    assert trained_text(processor, labels) == " red<|endoftext|> Yes.<|endoftext|>"
    assert labels.count(IGNORE_INDEX) == len(labels) - len([t for t in labels if t != IGNORE_INDEX])
    # image placeholders are never targets
    assert all(l == IGNORE_INDEX for i, l in zip(ids, labels) if i == processor.image_token_index)
    assert ids.count(processor.image_token_index) == processor.image_seq_length


def test_plain_template_trains_caption_and_newline(processor):
    conv = Conversation("s", [("user", "<image>\nDescribe the image."), ("assistant", "a red circle")], ["x.png"])
    ids, labels = tokenize_conversation(conv, processor, "plain")
    assert trained_text(processor, labels) == "a red circle\n"
    assert ids[:processor.image_seq_length] == [processor.image_token_index] * processor.image_seq_length


def test_labels_with_bos_tokenizer():
    _, proc = make_tiny_bunny(bos=True)
    conv = Conversation("s", [("user", "<image>\nWhat color?"), ("assistant", "blue")], ["x.png"])
    ids, labels = tokenize_conversation(conv, proc, "bunny")
    assert ids[0] == proc.tokenizer.bos_token_id and ids.count(proc.tokenizer.bos_token_id) == 1
    assert ids == proc.tokenize(get_template("bunny").render(conv.turns))
    assert trained_text(proc, labels) == " blue<|endoftext|>"


def test_text_only_and_several_images(processor):
    text_only = Conversation("t", [("user", "Hi"), ("assistant", "Hello")])
    ids, labels = tokenize_conversation(text_only, processor, "bunny")
    assert processor.image_token_index not in ids and trained_text(processor, labels) == " Hello<|endoftext|>"
    two = Conversation("m", [("user", "<image>\n<image>\nSame?"), ("assistant", "No")], ["a", "b"])
    ids, _ = tokenize_conversation(two, processor, "bunny")
    assert ids.count(processor.image_token_index) == 2 * processor.image_seq_length


def test_sample_that_trains_on_nothing_names_its_id(processor):
    unanswered = Conversation("lonely-7", [("user", "<image>\nWhat?")], ["x.png"])
    with pytest.raises(BunnyError, match="lonely-7.*nothing"):
        tokenize_conversation(unanswered, processor, "bunny")
    long = Conversation("long-3", [("user", "<image>\n" + "word " * 50), ("assistant", "red")], ["x.png"])
    with pytest.raises(BunnyError, match="long-3.*nothing.*truncation"):
        tokenize_conversation(long, processor, "bunny", max_length=30)


# -- loading rules ---------------------------------------------------------------------------

def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"id": "a",\n  "conversations": [}\n]')
    with pytest.raises(BunnyError, match=r"bad\.json:3: malformed JSON"):
        load_conversations(path)
    lines = tmp_path / "bad.jsonl"
    lines.write_text(json.dumps(sample(image=None)) + "\n{oops\n")
    with pytest.raises(BunnyError, match=r"bad\.jsonl:2: malformed JSON"):
        load_conversations(lines)


def test_missing_image_is_an_error_or_skipped_and_reported(tmp_path):
    random_image().save(tmp_path / "ok.png")
    path = write(tmp_path, [sample("good", "ok.png"), sample("ghost-1", "nowhere.png")])
    with pytest.raises(BunnyError, match=r"ghost-1.*nowhere\.png"):
        load_conversations(path)
    convs, report = load_conversations(path, skip_missing=True)
    assert [c.id for c in convs] == ["good"]
    assert report.skipped_missing == [("ghost-1", str(tmp_path / "nowhere.png"))]
    assert "skipped 1" in report.summary()


def test_roles_must_alternate(tmp_path):
    bad = {"id": "twice", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}
    with pytest.raises(BunnyError, match="twice.*alternate"):
        load_conversations(write(tmp_path, [bad]))
    gpt_first = {"id": "g", "conversations": [{"from": "gpt", "value": "a"}]}
    with pytest.raises(BunnyError, match="alternate"):
        load_conversations(write(tmp_path, [gpt_first]))


def test_placeholder_count_and_llava_prepend_rule(tmp_path):
    random_image().save(tmp_path / "i.png")
    no_placeholder = {"id": "p", "image": "i.png", "conversations": [
        {"from": "human", "value": "What?"}, {"from": "gpt", "value": "red"}]}
    convs, _ = load_conversations(write(tmp_path, [no_placeholder], "d.jsonl"))
    assert convs[0].turns[0][1] == "<image>\nWhat?"
    two_placeholders = sample("q", "i.png", ("<image> and", "red"))
    with pytest.raises(BunnyError, match="q.*2 <image> placeholders but 1 images"):
        load_conversations(write(tmp_path, [two_placeholders]))


# -- dataset, collation, sampling --------------------------------------------------------------

def test_dataset_and_collate_pad_right(tmp_path, processor):
    random_image(size=(30, 20)).save(tmp_path / "i.png")
    path = write(tmp_path, [sample("a", "i.png"), sample("b", None, ("Hi there, how are you?", "Fine"))])
    convs, _ = load_conversations(path)
    ds = ConversationDataset(convs, processor, "bunny", "pad")
    batch = collate([ds[0], ds[1]], processor.pad_token_id)
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    lengths = batch["attention_mask"].sum(1).tolist()
    s = lengths.index(min(lengths))  # the shorter sample is padded on the right
    assert min(lengths) < max(lengths)
    assert (batch["input_ids"][s, min(lengths):] == processor.pad_token_id).all()
    assert (batch["labels"][s, min(lengths):] == IGNORE_INDEX).all()
    assert count_targets(batch["labels"]) == sum(int((torch.tensor(ds.encoded[i][1][1:]) != -100).sum()) for i in (0, 1))
    left = collate([ds[0], ds[1]], processor.pad_token_id, padding_side="left")
    assert left["attention_mask"][s, 0] == 0 and left["attention_mask"][s, -1] == 1


def test_orders_are_seeded_permutations_and_grouped_by_modality():
    assert shuffled_order(10, 0, 0) == shuffled_order(10, 0, 0) != shuffled_order(10, 0, 1)
    lengths = [5, 50, 6, 60, 7, 70, 8, 80]
    has_image = [False, True] * 4
    order = modality_length_grouped_order(lengths, has_image, batch_size=2, seed=0, epoch=0)
    assert sorted(order) == list(range(8))
    for k in range(0, 8, 2):  # each batch of 2 holds one modality
        assert has_image[order[k]] == has_image[order[k + 1]]
