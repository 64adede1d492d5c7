"""Parsers: raw model text -> the answer the official scripts would read from it.

Pure functions, no I/O. Every parser first strips surrounding whitespace, as the
reference's generation loop does before it writes a prediction. A parser returns None
where the official rule finds no answer; scorers decide what that costs.
"""
from __future__ import annotations

import re

OPTION_LETTERS = ("A", "B", "C", "D", "E")  # ScienceQA's option alphabet in the reference


def parse_mme(text: str) -> str:
    """MME (calculation_mme.py): 'yes' / 'no' / 'other'.

    Lowercase; an exact yes/no wins, else look for "yes" then "no" in the first 4 chars.
    """
    t = text.strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def parse_pope(text: str) -> str:
    """POPE (LLaVA eval_pope.py): keep the first sentence, drop commas, split on spaces;
    'no' if a word is exactly "No", "not" or "no", else 'yes' (so empty text is 'yes')."""
    t = text.strip()
    if "." in t:
        t = t.split(".")[0]
    words = t.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_gqa(text: str) -> str:
    """GQA (convert_gqa_for_eval.py): strip trailing periods, lowercase."""
    return text.strip().rstrip(".").lower()


def parse_seed(text: str) -> str:
    """SEED-Bench-1: the whole (stripped) text must be the letter; no extraction."""
    return text.strip()


_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_scienceqa_letter(text: str) -> str | None:
    """ScienceQA (Bunny eval_science_qa.py): the letter the official rules read, or None
    where they read none (the script's "FAILED").

    In order: exactly a letter A-E; "X. ..." with X in A-E; exactly one match of
    `The answer is ([A-Z]).` (any capital, and the unescaped '.' is any character, so
    "The answer is B" at the very end of the text does not match). The letter may name no
    choice ("D" with three choices, "The answer is F."): that is an answer, and a wrong one.
    """
    t = text.strip()
    if t in OPTION_LETTERS:
        return t
    if len(t) >= 3 and t[0] in OPTION_LETTERS and t[1:3] == ". ":
        return t[0]
    found = _SQA_ANSWER_IS.findall(t)
    return found[0] if len(found) == 1 else None


# --- MMBench: VLMEvalKit can_infer (the 2024 version the MMBench server used) ---

_REJECTIONS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_OPTION_PUNCT = ".()[],:;!*#{}"


def _infer_option(answer: str, choices: dict[str, str]) -> str | None:
    """A letter that appears as a whole token exactly once among the choices."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in _REJECTIONS):
        return "Z"  # VLMEvalKit's "refused" answer; never matches a ground truth
    for c in _OPTION_PUNCT:
        answer = answer.replace(c, " ")
    tokens = answer.split()
    present = [k for k in choices if k in tokens]
    if len(present) == 1:
        return present[0]
    if not present and "Z" in tokens:
        return "Z"
    return None


def _infer_text(answer: str, choices: dict[str, str]) -> str | None:
    """The one choice whose text (lowercased) is a substring of the answer."""
    answer = answer.lower()
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def parse_mmbench(text: str, choices: dict[str, str]) -> str | None:
    """MMBench: VLMEvalKit `can_infer` -- the option letter, else a unique option text.

    `choices` maps present letters to option texts, e.g. {"A": "cat", "B": "dog"}.
    None where the official pipeline would fall back to a ChatGPT judge.
    """
    return _infer_option(text, choices) or _infer_text(text, choices)
