"""Readers of the hub parquet layouts (tiny files written here) and prompt building."""
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bunny.errors import BunnyError
from bunny.eval.datasets import decode_image, prediction_record, read_benchmark
from bunny.eval.prompts import build_prompt
from bunny.eval.records import validate_records


def _img():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_mme_reader_prompt_and_record(tmp_path):
    rows = [dict(question_id="code_reasoning/0020.png", image=_img(), category="code_reasoning",
                 question=q, answer=a)
            for q, a in [("Is the output 3? Please answer yes or no.", "Yes"),
                         ("Is the output 4? Please answer yes or no.", "No")]]
    _write(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    samples = read_benchmark("mme", tmp_path, split="test")
    assert [s["question_id"] for s in samples] == ["code_reasoning/0020.png#0",
                                                   "code_reasoning/0020.png#1"]
    text, images = build_prompt("mme", samples[0])
    assert text == "Is the output 3?\nAnswer the question using a single word or phrase."
    assert decode_image(images[0]).size == (4, 4)
    records = [prediction_record("mme", s, "Yes") for s in samples]
    validate_records("mme", records)


def test_missing_columns_are_listed(tmp_path):
    _write(tmp_path / "test-0.parquet", [dict(question="q", answer="yes")])
    with pytest.raises(BunnyError, match="not a pope dataset; missing columns: "
                                         "question_id, image, category"):
        read_benchmark("pope", tmp_path)


def test_unknown_split_lists_found(tmp_path):
    _write(tmp_path / "validation-0.parquet", [dict(question="q")])
    with pytest.raises(BunnyError, match="found: validation"):
        read_benchmark("vqav2", tmp_path, split="testdev")


def test_mmbench_rotations_and_prompt(tmp_path):
    _write(tmp_path / "en" / "dev-0.parquet", [dict(
        index=12, question="What animal?", hint="A farm.", A="cat", B="dog", C="cow",
        D=None, answer="B", image=_img())])
    samples = read_benchmark("mmbench", tmp_path, split="dev")
    assert [(s["index"], s["A"], s["B"], s["C"], s["answer"]) for s in samples] == [
        (12, "cat", "dog", "cow", "B"),
        (1_000_012, "dog", "cow", "cat", "A"),
        (2_000_012, "cow", "cat", "dog", "C"),
    ]
    text, _ = build_prompt("mmbench", samples[1])
    assert text == ("A farm.\nWhat animal?\nA. dog\nB. cow\nC. cat\n"
                    "Answer with the option's letter from the given choices directly.")
    validate_records("mmbench", [prediction_record("mmbench", s, "A") for s in samples])


def test_mmmu_reader_and_prompts(tmp_path):
    rows = [dict(id="validation_Art_1", question="Which <image 1>?", options="['red', 'blue']",
                 answer="B", question_type="multiple-choice", image_1=_img()),
            dict(id="validation_Art_2", question="How many?", options="[]",
                 answer="['24', '24.0']", question_type="open", image_1=_img())]
    _write(tmp_path / "Art" / "validation-00000-of-00001.parquet", rows)
    mc, op = read_benchmark("mmmu", tmp_path, split="validation")
    assert mc["options"] == ["red", "blue"] and op["answer"] == ["24", "24.0"]
    assert build_prompt("mmmu", mc)[0] == ("Which <image 1>?\n(A) red\n(B) blue\n\n"
                                           "Answer with the option's letter from the given "
                                           "choices directly.")
    assert build_prompt("mmmu", op)[0] == ("How many?\n"
                                           "Answer the question using a single word or phrase.")


def test_scienceqa_seed_gqa(tmp_path):
    _write(tmp_path / "sqa" / "test-0.parquet", [
        dict(image=None, question="Which is a metal?", choices=["wood", "iron"], answer=1,
             hint="")])
    (s,) = read_benchmark("scienceqa", tmp_path / "sqa")
    assert s["answer"] == "B" and s["images"] == []
    assert build_prompt("scienceqa", s)[0] == (
        "Which is a metal?\nA. wood\nB. iron\n"
        "Answer with the option's letter from the given choices directly.")

    _write(tmp_path / "seed" / "test-0.parquet", [dict(
        question_id="101", question="What?", choice_a="a", choice_b="b", choice_c="c",
        choice_d="d", answer="C", data_type="video", image=[_img(), _img(), _img()])])
    (s,) = read_benchmark("seed", tmp_path / "seed")
    assert len(s["images"]) == 1
    assert build_prompt("seed", s)[0].startswith("What?\nA. a\nB. b\nC. c\nD. d\nAnswer with")

    _write(tmp_path / "gqa" / "q" / "testdev-0.parquet",
           [dict(id="q1", imageId="n1", question="Is it red?", answer="yes")])
    _write(tmp_path / "gqa" / "i" / "testdev-0.parquet", [dict(id="n1", image=_img())])
    (s,) = read_benchmark("gqa", tmp_path / "gqa", split="testdev")
    assert build_prompt("gqa", s)[0] == ("Is it red?\n"
                                         "Answer the question using a single word or phrase.")
