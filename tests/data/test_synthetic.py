"""The synthetic scene generator: determinism, balance, answer correctness, file formats."""
import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bunny.data.synthetic import (COLOURS, SHAPES, Scene, SceneObject, caption,
                                  colour_only_guess_accuracy, draw_example, easy_pairs,
                                  hard_pairs, majority_answer_accuracy, shape_only_guess_accuracy)
from bunny.data.llava import load_conversations
from bunny.data.synthetic_io import SHORT_ANSWER_SUFFIX, synthesize
from bunny.data.synthetic_render import (BACKGROUND, RGB, patch_attribute_labels,
                                         render_scene, render_with_patch_labels)
from bunny.errors import BunnyError

N_EVAL = 200


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    meta = synthesize(out, n_train=16, n_eval=N_EVAL, seed=3)
    records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    return out, meta, records


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    synthesize(tmp_path / "a", 6, 4, seed=7)
    synthesize(tmp_path / "b", 6, 4, seed=7)
    synthesize(tmp_path / "c", 6, 4, seed=8)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and a["stage2.json"] != c["stage2.json"]
    assert not any(name.endswith(".tmp") for name in a)  # atomic writes leave no temp files


def test_image_i_does_not_depend_on_split_size():
    assert draw_example(0, "train", 5) == draw_example(0, "train", 5)
    assert draw_example(0, "train", 5) != draw_example(0, "eval", 5)


def test_yes_no_balanced_with_exact_hard_easy_split(dataset):
    _, meta, records = dataset
    yn = [r for r in records if r["kind"] == "yes_no"]
    counts = Counter(r["category"] for r in yn)
    assert counts == {"positive": N_EVAL, "hard": N_EVAL // 2, "easy": N_EVAL // 2}
    assert Counter(r["answer"] for r in yn) == {"yes": N_EVAL, "no": N_EVAL}
    # MME-style pairing: each image has exactly one yes and one no question.
    by_image = Counter((r["image_id"], r["answer"]) for r in yn)
    assert set(by_image.values()) == {1} and len(by_image) == 2 * N_EVAL


def test_guessers_score_exactly_three_quarters(dataset):
    _, meta, records = dataset
    assert colour_only_guess_accuracy(records) == 0.75
    assert shape_only_guess_accuracy(records) == 0.75
    assert meta["yes_no_colour_only"] == meta["yes_no_shape_only"] == 0.75


def test_guesser_golden_values():
    scene = [{"colour": "red", "shape": "circle", "position": "left"},
             {"colour": "blue", "shape": "square", "position": "right"}]
    rec = lambda c, s, a: {"kind": "yes_no", "colour": c, "shape": s, "answer": a, "scene": scene}  # noqa: E731
    records = [rec("red", "circle", "yes"), rec("red", "square", "no"),  # hard no
               rec("green", "cross", "no"), {"kind": "open", "answer": "red"}]  # easy no, ignored
    assert colour_only_guess_accuracy(records) == pytest.approx(2 / 3)
    assert shape_only_guess_accuracy(records) == pytest.approx(2 / 3)
    with pytest.raises(BunnyError):
        colour_only_guess_accuracy([{"kind": "open"}])


def test_majority_answer_golden_values(dataset):
    records = [{"kind": "open", "category": "count", "answer": a} for a in ("1", "2", "1", "3")]
    records += [{"kind": "open", "category": "colour", "answer": "red"}, {"kind": "yes_no", "answer": "yes"}]
    assert majority_answer_accuracy(records, "count") == 0.5
    assert majority_answer_accuracy(records, "colour") == 1.0
    with pytest.raises(BunnyError, match="position"):
        majority_answer_accuracy(records, "position")
    _, meta, all_records = dataset  # meta.json carries count's answer prior
    counts = [r["answer"] for r in all_records if r["kind"] == "open" and r["category"] == "count"]
    assert meta["count_majority"] == Counter(counts).most_common(1)[0][1] / len(counts)


def _expected(scene: list[dict], r: dict) -> str:
    """Recompute every answer from the scene alone."""
    objs = [(o["colour"], o["shape"], o["position"]) for o in scene]
    if r["kind"] == "yes_no":
        present = (r["colour"], r["shape"]) in {(c, s) for c, s, _ in objs}
        colours, shapes = {c for c, _, _ in objs}, {s for _, s, _ in objs}
        if r["category"] == "hard":
            assert r["colour"] in colours and r["shape"] in shapes
        if r["category"] == "easy":
            assert r["colour"] not in colours and r["shape"] not in shapes
        return "yes" if present else "no"
    cat = r["category"]
    if cat == "colour":
        (answer,) = {c for c, s, _ in objs if s == r["shape"]}  # unique by construction
        return answer
    if cat == "shape":
        (answer,) = {s for c, s, _ in objs if c == r["colour"]}
        return answer
    if cat == "count":
        return str(sum(s == r["shape"] for _, s, _ in objs))
    (answer,) = [p for c, s, p in objs if (c, s) == (r["colour"], r["shape"])]
    return answer


def test_every_answer_follows_from_the_scene(dataset):
    _, _, records = dataset
    for r in records:
        assert r["answer"] == _expected(r["scene"], r), r
    assert {r["category"] for r in records if r["kind"] == "open"} == {
        "colour", "shape", "count", "position"}


def test_images_show_the_scene(dataset):
    out, _, records = dataset
    centre = {"left": (10, 32), "right": (53, 32), "top": (32, 10), "bottom": (32, 53),
              "center": (32, 32)}
    for r in records[::7]:
        img = np.asarray(Image.open(out / r["image"]))
        assert img.shape == (64, 64, 3)
        occupied = {o["position"]: o["colour"] for o in r["scene"]}
        for pos, (x, y) in centre.items():
            want = RGB[occupied[pos]] if pos in occupied else BACKGROUND
            assert np.abs(img[y, x].astype(int) - want).max() <= 2, (r["image"], pos)


def test_patch_labels_match_pixels():
    scene, _ = draw_example(0, "train", 11)
    pixels, objects = render_with_patch_labels(scene)
    labels = patch_attribute_labels(scene, objects)
    assert objects.shape == (64,) and (objects >= 0).any()
    patches = pixels.reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(64, 64, 3)
    for p in np.flatnonzero(objects >= 0):
        colour = COLOURS[labels["colour"][p] - 1]
        near = np.abs(patches[p].astype(int) - RGB[colour]).max(axis=1) <= 8
        assert near.any(), (p, colour)  # the labelled object's colour is in the patch
    assert (labels["shape"][objects < 0] == 0).all()
    assert np.array_equal(np.asarray(render_scene(scene)), pixels)


def test_caption_golden():
    scene = Scene((SceneObject("blue", "square", "top"), SceneObject("orange", "circle", "left"),
                   SceneObject("blue", "square", "right")))
    assert caption(scene) == "two blue squares at the top and on the right and an orange circle on the left"
    assert hard_pairs(scene) == [("blue", "circle"), ("orange", "square")]
    assert ("red", "cross") in easy_pairs(scene) and ("red", "square") not in easy_pairs(scene)


def test_llava_json_format(dataset):
    out, _, records = dataset
    for name in ("stage1.json", "stage2.json"):
        samples = json.loads((out / name).read_text())
        assert len(samples) == 16 and len({s["id"] for s in samples}) == 16
        for s in samples:
            assert set(s) == {"id", "image", "conversations"} and (out / s["image"]).is_file()
            turns = s["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in turns) == 1
            assert all(t["value"] for t in turns)
        conversations, report = load_conversations(out / name)  # the trainer's own loader
        assert report.loaded == 16 and len(conversations[0].images) == 1
    s2 = json.loads((out / "stage2.json").read_text())[0]["conversations"]
    assert all(t["value"].endswith(SHORT_ANSWER_SUFFIX) for t in s2[::2])
    assert {"question_id", "image", "image_id", "question", "prompt", "answer", "kind",
            "category", "colour", "shape", "scene"} == set(records[0])
    assert len({r["question_id"] for r in records}) == len(records)
    assert all(r["answer"] for r in records) and {r["kind"] for r in records} == {"yes_no", "open"}


def test_max_turns_keeps_the_yes_no_pair(tmp_path):
    synthesize(tmp_path, 10, 0, seed=1, max_turns=2, suffix="")
    for s in json.loads((tmp_path / "stage2.json").read_text()):
        answers = sorted(t["value"] for t in s["conversations"][1::2])
        assert answers == ["no", "yes"]


def test_extra_yes_no_pairs_are_distinct_balanced_and_true(tmp_path):
    from bunny.data.synthetic import draw_example

    synthesize(tmp_path, 24, 0, seed=2, suffix="", yes_no_per_image=3)
    samples = json.loads((tmp_path / "stage2.json").read_text())
    more = 0
    for i, s in enumerate(samples):
        scene, _ = draw_example(2, "train", i)
        turns = s["conversations"]
        qa = [(turns[k]["value"].removeprefix("<image>\n"), turns[k + 1]["value"]) for k in range(0, len(turns), 2)]
        yes_no = [(q, a) for q, a in qa if q.startswith("Is there")]
        assert len({q for q, _ in yes_no}) == len(yes_no)  # never the same question twice
        assert sum(a == "yes" for _, a in yes_no) == sum(a == "no" for _, a in yes_no)
        for q, a in yes_no:
            colour, shape = q.split()[3:5]
            assert a == ("yes" if (colour, shape) in scene.pairs else "no"), (q, scene.pairs)
        more += len(yes_no) > 2
    assert more > 5  # scenes with two or more distinct objects get extra pairs
    # the default stays one pair per image
    synthesize(tmp_path / "one", 24, 0, seed=2, suffix="")
    for s in json.loads((tmp_path / "one" / "stage2.json").read_text()):
        assert sum(t["value"] in ("yes", "no") for t in s["conversations"][1::2]) == 2


def _no_kinds(folder):
    """(hard, easy) counts of the training "no" questions, judged against each scene."""
    captions = [r["conversations"][1]["value"] for r in json.loads((folder / "stage1.json").read_text())]
    hard = easy = 0
    for i, s in enumerate(json.loads((folder / "stage2.json").read_text())):
        turns = s["conversations"]
        for k in range(0, len(turns), 2):
            q, a = turns[k]["value"].removeprefix("<image>\n"), turns[k + 1]["value"]
            if q.startswith("Is there") and a == "no":
                colour, shape = q.split()[3:5]
                is_hard = _is_hard(captions[i], colour, shape)
                hard, easy = hard + is_hard, easy + (not is_hard)
    return hard, easy


def _is_hard(caption, colour, shape):
    """Whether the asked colour and shape both appear in the scene (its caption in
    stage1.json names every object)."""
    return f" {colour} " in f" {caption} " and (shape in caption)


def test_train_hard_share_moves_training_no_questions_only(tmp_path):
    synthesize(tmp_path / "half", 40, 4, seed=3, suffix="", yes_no_per_image=2)
    synthesize(tmp_path / "hard", 40, 4, seed=3, suffix="", yes_no_per_image=2, train_hard_share=1.0)
    h_half, e_half = _no_kinds(tmp_path / "half")
    h_hard, e_hard = _no_kinds(tmp_path / "hard")
    assert h_hard > h_half and e_hard < e_half
    assert e_hard <= 2  # only scenes with no hard pair left fall back to easy
    # the evaluation split does not move
    assert (tmp_path / "half" / "eval.jsonl").read_text() == (tmp_path / "hard" / "eval.jsonl").read_text()
    with pytest.raises(BunnyError, match="train_hard_share"):
        synthesize(tmp_path / "bad", 2, 2, train_hard_share=1.5)


def test_an_orange(tmp_path):
    from bunny.data.synthetic import yes_no_question

    assert yes_no_question("orange", "cross") == "Is there an orange cross in the image?"
    assert yes_no_question("red", "cross") == "Is there a red cross in the image?"


@pytest.mark.parametrize("kwargs", [dict(n_train=2, n_eval=3), dict(n_train=-1, n_eval=2),
                                    dict(n_train=2, n_eval=2, max_turns=0),
                                    dict(n_train=2, n_eval=2, yes_no_per_image=0)])
def test_bad_input_raises(tmp_path, kwargs):
    with pytest.raises(BunnyError):
        synthesize(tmp_path, **kwargs)


def test_bad_scene_raises():
    with pytest.raises(BunnyError):
        Scene((SceneObject("red", "circle", "left"), SceneObject("red", "circle", "left")))
    with pytest.raises(BunnyError):
        Scene((SceneObject("pink", "circle", "left"),))


def test_cli_synth(tmp_path, capsys):
    from bunny.data.cli import add_parsers

    parser = argparse.ArgumentParser(prog="bunny")
    add_parsers(parser.add_subparsers(dest="command", required=True), {})
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path), "--train", "3",
                              "--eval", "2", "--seed", "5", "--no-suffix"])
    assert args.func(args) == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["seed"] == 5 and meta["suffix"] == "" and len(SHAPES) == len(meta["shapes"])
