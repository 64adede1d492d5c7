"""Scores on hand-made records, with the expected numbers worked out by hand."""
import random

import pytest

from bunny.errors import BunnyError
from bunny.eval.registry import get_benchmark, score_records


def test_mme_acc_plus():
    rec = lambda q, img, ans, pred, cat="existence": dict(  # noqa: E731
        question_id=q, image=img, answer=ans, prediction=pred, category=cat)
    records = [rec(1, "a.jpg", "Yes", "Yes"), rec(2, "a.jpg", "No", "No, there is not."),
               rec(3, "b.jpg", "Yes", "yes."), rec(4, "b.jpg", "No", "Yes"),
               rec(5, "c.png", "Yes", "no", "code_reasoning"),
               rec(6, "c.png", "No", "no", "code_reasoning")]
    m = score_records("mme", records)
    assert m["existence"] == pytest.approx(75.0 + 50.0)   # acc 3/4, acc+ 1/2
    assert m["code_reasoning"] == pytest.approx(50.0)      # acc 1/2, acc+ 0/1
    assert m["perception"] == pytest.approx(125.0)
    assert m["cognition"] == pytest.approx(50.0)


def test_mme_requires_pairs():
    records = [dict(question_id=1, image="a", answer="Yes", prediction="Yes",
                    category="color")]
    with pytest.raises(BunnyError, match="2 per image"):
        score_records("mme", records)


def test_pope_per_category_and_mean_f1():
    rows = [("random", "yes", "Yes"), ("random", "yes", "No."), ("random", "no", "no"),
            ("random", "no", "Yes, there is."),
            ("popular", "yes", "Yes"), ("popular", "no", "There is not.")]
    records = [dict(question_id=i, category=c, answer=a, prediction=p)
               for i, (c, a, p) in enumerate(rows)]
    m = score_records("pope", records)
    assert m["random"] == pytest.approx(dict(accuracy=0.5, precision=0.5, recall=0.5, f1=0.5,
                                             yes_ratio=0.5))
    assert m["popular"] == pytest.approx(dict(accuracy=1.0, precision=1.0, recall=1.0, f1=1.0,
                                              yes_ratio=0.5))
    assert "adversarial" not in m
    assert m["f1_mean"] == pytest.approx(0.75)


def test_vqav2():
    records = [dict(question_id=1, prediction="Two.", answers=["2"] * 10),
               dict(question_id=2, prediction="yes", answers=["yes"] * 2 + ["no"] * 8)]
    assert score_records("vqav2", records)["accuracy"] == pytest.approx((1.0 + 0.6) / 2 * 100)


def test_gqa():
    records = [dict(question_id=1, prediction="Table.", answer="table"),
               dict(question_id=2, prediction="the table", answer="table")]
    assert score_records("gqa", records) == {"accuracy": 50.0}


def test_seed_all_and_image():
    records = [dict(question_id=1, prediction="A", answer="A", data_type="image"),
               dict(question_id=2, prediction="A.", answer="A", data_type="image"),
               dict(question_id=3, prediction="C", answer="C", data_type="video")]
    m = score_records("seed", records)
    assert m["accuracy"] == pytest.approx(200 / 3)
    assert m["accuracy_image"] == pytest.approx(50.0)


def _sqa(i, pred, answer="B"):
    return dict(question_id=i, prediction=pred, answer=answer, choices=["x", "y", "z"])


def test_scienceqa_counts_unparseable_as_the_reference_marks_failed():
    records = [_sqa(1, "B"), _sqa(2, "The answer is B."), _sqa(3, "A. x"),
               _sqa(4, "maybe"), _sqa(5, "The answer is B"), _sqa(6, "FAILED"),  # FAILED in the reference
               _sqa(7, "D"), _sqa(8, "The answer is F.")]  # parsed, but no such choice
    assert score_records("scienceqa", records) == {"accuracy": 25.0, "unparseable": 3, "out_of_choices": 2}


def test_scienceqa_reference_fallback_is_seeded():
    records = [_sqa(i, "I do not know") for i in range(50)]
    m = score_records("scienceqa", records, reference_fallback=True, seed=7)
    rng = random.Random(7)
    expected = sum(rng.choice(range(3)) == 1 for _ in range(50)) * 2.0
    assert m == {"accuracy": pytest.approx(expected), "unparseable": 50, "out_of_choices": 0, "fallback_seed": 7}
    assert score_records("scienceqa", records)["accuracy"] == 0.0


def test_scienceqa_reference_fallback_draws_for_out_of_choices_letters_too():
    records = [_sqa(i, "D") for i in range(50)]  # LLaVA's original drew for any letter outside the choices
    m = score_records("scienceqa", records, reference_fallback=True, seed=3)
    rng = random.Random(3)
    assert m["accuracy"] == pytest.approx(sum(rng.choice(range(3)) == 1 for _ in range(50)) * 2.0)
    assert (m["unparseable"], m["out_of_choices"]) == (0, 50)


def _mmb(index, pred, answer, a="cat", b="dog", c="bird"):
    return dict(question_id=index, index=index, prediction=pred, answer=answer,
                A=a, B=b, C=c, D=None)


def test_mmbench_circular():
    records = [
        # question 5 and its two rotations: all right -> counts
        _mmb(5, "B", "B"), _mmb(1_000_005, "A", "A", "dog", "bird", "cat"),
        _mmb(2_000_005, "dog", "C", "bird", "cat", "dog"),
        # question 7: original right, one rotation wrong -> does not count
        _mmb(7, "A", "A"), _mmb(1_000_007, "I cannot tell", "C", "dog", "bird", "cat"),
    ]
    assert score_records("mmbench", records) == {"circular_accuracy": 50.0, "unparseable": 1}


def _mmmu(i, pred, answer, qtype="multiple-choice"):
    options = ["cat", "dog", "bird", "fish"] if qtype == "multiple-choice" else []
    return dict(question_id=i, prediction=pred, answer=answer, question_type=qtype,
                options=options)


def test_mmmu_accuracy_and_unparseable():
    records = [_mmmu(1, "(B)", "B"), _mmmu(2, "The answer is 42.", "42", "open"),
               _mmmu(3, "???", "A"), _mmmu(4, "C", "D")]
    assert score_records("mmmu", records) == {"accuracy": 50.0, "unparseable": 1}


def test_mmmu_reference_fallback_is_seeded():
    records = [_mmmu(i, "hmm", "A") for i in range(40)]
    m = score_records("mmmu", records, reference_fallback=True, seed=3)
    rng = random.Random(3)
    expected = sum(rng.choice("ABCD") == "A" for _ in range(40)) / 40 * 100
    assert m["accuracy"] == pytest.approx(expected)
    assert m["unparseable"] == 40


def test_fallback_only_where_the_reference_has_one():
    records = [dict(question_id=1, prediction="a", answer="a")]
    with pytest.raises(BunnyError, match="scienceqa, mmmu"):
        score_records("gqa", records, reference_fallback=True)


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(BunnyError, match="valid: mme, pope, vqav2, gqa, scienceqa, seed"):
        get_benchmark("MME")
