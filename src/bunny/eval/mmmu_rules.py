"""MMMU's official answer parsing and judging (MMMU-Benchmark eval/eval_utils.py).

Pure functions. The one departure: `parse_multi_choice` returns None where the official
parser picks a random letter; the scorer decides whether to count it wrong or to draw the
reference's random choice with an explicit seed.
"""
from __future__ import annotations

import re

_EDGE_PUNCT = [",", ".", "!", "?", ";", ":", "'"]


def parse_multi_choice(response: str, options: list[str]) -> str | None:
    """The chosen letter ("A", "B", ...) or None when the official rule finds nothing.

    Order of the official rule: "(X)" anywhere; else " X " as a word; else (only for
    responses longer than 5 words) option texts contained in the response. Several
    candidates: the one whose mention starts last wins (first listed on ties).
    """
    letters = [chr(ord("A") + i) for i in range(len(options))]
    for ch in _EDGE_PUNCT:  # one character class at a time, in this order
        response = response.strip(ch)
    response = f" {response} "  # so " A " also matches at the edges

    bracketed = [c for c in letters if f"({c})" in response]
    if bracketed:
        candidates, marks = bracketed, [response.rfind(f"({c})") for c in bracketed]
    else:
        spaced = [c for c in letters if f" {c} " in response]
        candidates, marks = spaced, [response.rfind(f" {c} ") for c in spaced]
        if not spaced and len(response.split()) > 5:
            low = response.lower()
            candidates = [c for c, text in zip(letters, options) if text.lower() in low]
            marks = [low.rfind(options[letters.index(c)].lower()) for c in candidates]
    if not candidates:
        return None
    # max() returns the first maximal element, like numpy.argmax in the official code.
    best = max(range(len(candidates)), key=lambda i: marks[i])
    return candidates[best]


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_answer(s: str) -> list:
    """A number rounded to 2 decimals, or the lowercased string; a one-character string
    becomes [" x", "x "] so that it cannot match inside another word."""
    s = s.strip()
    if _is_number(s):
        return [round(float(s.replace(",", "")), 2)]
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def extract_numbers(s: str) -> list[str]:
    """Numbers with thousands commas, then scientific notation, then plain numbers."""
    return _NUM_COMMAS.findall(s) + _NUM_SCIENTIFIC.findall(s) + _NUM_SIMPLE.findall(s)


_KEY_INDICATORS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ",
                   "result "]
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # The official split looks for ". " before a capital letter, but the text is already
    # lowercased, so in practice only newlines split it. Kept as is.
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, part in enumerate(parts):
        indicators = _KEY_INDICATORS + (["="] if i == len(parts) - 1 else [])
        shortest = None
        for ind in indicators:
            if ind in part:
                tail = part.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list:
    """Candidate answers of an open response: key phrases and the numbers in them,
    normalised and de-duplicated (official parse_open_response)."""
    keys = _key_subresponses(response)
    raw = list(keys)
    for k in keys:
        raw.extend(extract_numbers(k))
    out = []
    for r in raw:
        out.extend(normalize_answer(r))
    return list(set(out))


def judge_open(gold: str | list[str], candidates: list) -> bool:
    """A number candidate must equal a normalised gold number; a string candidate must
    contain a normalised gold string."""
    golds = gold if isinstance(gold, list) else [gold]
    norm = [n for g in golds for n in normalize_answer(g)]
    for cand in candidates:
        if isinstance(cand, str):
            if any(isinstance(n, str) and n in cand for n in norm):
                return True
        elif cand in norm:
            return True
    return False


def judge_multi_choice(gold: str | list[str], letter: str | None) -> bool:
    golds = gold if isinstance(gold, list) else [gold]
    return letter is not None and letter in golds


def choose_letter(prediction: str, options: list[str], rng, reference_fallback: bool) -> tuple[str | None, bool]:
    """(letter, parsed): the parsed option letter, or None when unparseable; with
    `reference_fallback` an unparseable answer gets a letter drawn from `rng` (a
    `random.Random`), as the official evaluation does."""
    letter = parse_multi_choice(prediction, options)
    parsed = letter is not None
    if not parsed and reference_fallback and options:
        letter = rng.choice([chr(ord("A") + i) for i in range(len(options))])
    return letter, parsed
