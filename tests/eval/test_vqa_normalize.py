"""Golden values of the official VQA normalisation and accuracy, worked out by hand from
the official definitions (vqaEval.py / EvalAI answer processor)."""
import pytest

from bunny.eval.vqa_normalize import (
    normalize_vqa_answer, process_digit_article, process_punctuation, vqa_accuracy,
)


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                      # number words -> digits
    ("ten dogs", "10 dogs"),
    ("none", "0"),
    ("The cat.", "cat"),               # article and final period dropped
    ("an apple", "apple"),
    ("dont know", "don't know"),       # contraction restored
    ("isnt", "isn't"),
    ("Yes!", "yes"),                   # casing and punctuation
    ("1,000", "1000"),                 # commas removed by the tokenizer step
    ("3.5", "3.5"),                    # a period before a digit stays
    ("red/blue", "red blue"),          # punctuation inside a word becomes a space
    ("red / blue", "red blue"),        # punctuation next to a space is deleted
    ("man's hat", "man 's hat"),       # possessive split as the official tokenizer does
    ("  multi\nline\tanswer ", "multi line answer"),
    ("", ""),
])
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_punctuation_rule_looks_at_digit_commas():
    # With "digit,digit" anywhere, every punctuation mark is deleted instead of spaced.
    assert process_punctuation("a-b 1,2") == "ab 12"
    assert process_punctuation("a-b") == "a b"


def test_period_strip_stops_after_32():
    # The official sub() call passes re.UNICODE (32) as the count.
    assert process_punctuation("." * 40) == "." * 8


def test_digit_article():
    assert process_digit_article("The Three cats") == "3 cats"


@pytest.mark.parametrize("n_yes, expected", [
    (10, 1.0),
    (4, 1.0),     # every leave-one-out subset still has >= 3 matches
    (3, 0.9),     # (3 * 2/3 + 7 * 1) / 10
    (2, 0.6),     # (2 * 1/3 + 8 * 2/3) / 10
    (1, 0.3),     # (1 * 0 + 9 * 1/3) / 10
    (0, 0.0),
])
def test_vqa_accuracy_leave_one_out(n_yes, expected):
    answers = ["yes"] * n_yes + ["no"] * (10 - n_yes)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected)


def test_humans_in_agreement_are_not_normalised():
    # All ten humans said "2": no normalisation, so a raw "two" does not match ...
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    # ... but the EvalAI step applied to predictions first turns it into "2".
    assert vqa_accuracy(normalize_vqa_answer("Two"), ["2"] * 10) == 1.0


def test_disagreeing_humans_are_normalised():
    answers = ["the dog"] * 5 + ["a cat"] * 5
    assert vqa_accuracy("dog", answers) == pytest.approx(1.0)
