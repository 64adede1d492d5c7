"""Hand-made golden cases for each parser, from the official rules."""
import pytest

from bunny.eval import mmmu_rules
from bunny.eval.parsers import (
    parse_gqa, parse_mmbench, parse_mme, parse_pope, parse_scienceqa_letter, parse_seed,
)


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("  YES ", "yes"),
    ("yes.", "yes"),                 # not exact, but "yes" is in the first 4 chars
    ("No, there is not.", "no"),
    ("Nope", "no"),                  # "no" in "nope"
    ("Not sure", "no"),
    ("I think yes", "other"),        # only the first 4 characters are searched
    ("The answer is no", "other"),
    ("", "other"),
])
def test_parse_mme(text, expected):
    assert parse_mme(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog.", "yes"),
    ("No.", "no"),
    ("no,", "no"),                   # commas removed before splitting
    ("There is not a cat in the image.", "no"),
    ("Yes. No.", "yes"),             # only the first sentence counts
    ("NO", "yes"),                   # words are case-sensitive: only No / no / not
    ("Nope", "yes"),
    ("", "yes"),                     # empty output counts as yes, as in the reference
])
def test_parse_pope(text, expected):
    assert parse_pope(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Table.", "table"), ("Yes", "yes"), ("left...", "left"), (" the table ", "the table"),
    ("", ""),
])
def test_parse_gqa(text, expected):
    assert parse_gqa(text) == expected


def test_parse_seed_is_exact():
    assert parse_seed(" A\n") == "A"
    assert parse_seed("A.") == "A."


@pytest.mark.parametrize("text, expected", [
    ("B", "B"),
    ("  C \n", "C"),                 # stripped, as the generation loop writes it
    ("B. Because it floats.", "B"),
    ("A. The answer is B.", "A"),     # the "X. " rule comes first
    ("The answer is C.", "C"),
    ("Reasoning... The answer is A, since", "A"),
    ("The answer is F.", "F"),        # [A-Z]: read, though no option is F
    ("D", "D"),                       # a letter; whether it names a choice is the scorer's question
    ("E. x", "E"),
    ("F", None),                      # exact letters are A-E only
    ("F. x", None),
    ("The answer is C", None),        # the official regex needs a character after the letter
    ("The answer is A. The answer is B.", None),  # two matches: ambiguous
    ("b", None),
    ("", None),
    ("AB", None),
    ("FAILED", None),
])
def test_parse_scienceqa_letter(text, expected):
    assert parse_scienceqa_letter(text) == expected


CHOICES = {"A": "cat", "B": "dog", "C": "bird"}


@pytest.mark.parametrize("text, expected", [
    ("A", "A"),
    ("(B) dog", "B"),
    ("The answer is C.", "C"),
    ("B: dog", "B"),
    ("It is a dog", "B"),            # lowercase "a" is not an option; option text is unique
    ("Dog", "B"),
    ("A or B", None),                # two letters and no option text
    ("cat and dog", None),           # two option texts
    ("", None),
    ("Cannot determine the answer", "Z"),
    ("Z", "Z"),
])
def test_parse_mmbench_can_infer(text, expected):
    assert parse_mmbench(text, dict(CHOICES)) == expected


OPTIONS = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize("text, expected", [
    ("(B)", "B"),
    ("B", "B"),
    ("The answer is (C).", "C"),
    ("I think it is B.", "B"),
    ("(A) or (B)", "B"),                           # the last mention wins
    ("The animal in the image is a dog", "B"),     # > 5 words: option text
    ("the picture shows a dog and a cat", "A"),    # two texts: the later one
    ("a dog", None),                               # <= 5 words: no text matching
    ("", None),
])
def test_mmmu_parse_multi_choice(text, expected):
    assert mmmu_rules.parse_multi_choice(text, OPTIONS) == expected


def test_mmmu_parse_open_numbers_and_strings():
    assert mmmu_rules.parse_open("The answer is 42.") == [42.0]
    assert 1000.0 in mmmu_rules.parse_open("1,000")
    assert mmmu_rules.parse_open("It is Paris.") == ["paris"]


@pytest.mark.parametrize("gold, response, expected", [
    ("42", "The answer is 42.", True),
    ("42.0", "so the result is 42", True),
    ("1000", "1,000", True),
    ("Paris", "It is Paris.", True),
    ("Paris", "It is London.", False),
    (["24", "24.0"], "24", True),
    ("3.14159", "3.14", True),       # numbers are rounded to 2 decimals on both sides
    ("", "anything", True),          # the official rule: "" is in every string
])
def test_mmmu_judge_open(gold, response, expected):
    assert mmmu_rules.judge_open(gold, mmmu_rules.parse_open(response)) is expected
