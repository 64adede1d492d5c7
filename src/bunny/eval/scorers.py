"""Scorers: a list of prediction records -> the metrics the reference reports.

Pure functions over already-validated records (see records.py for the file contract).
Percentages unless said otherwise; POPE reports fractions as the reference prints them.
"""
from __future__ import annotations

import random
from collections import defaultdict

from bunny.errors import BunnyError
from bunny.eval import mmmu_rules
from bunny.eval.parsers import (
    OPTION_LETTERS, parse_gqa, parse_mmbench, parse_mme, parse_pope, parse_scienceqa_letter, parse_seed,
)
from bunny.eval.vqa_normalize import normalize_vqa_answer, vqa_accuracy

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")
POPE_CATEGORIES = ("random", "popular", "adversarial")
MMBENCH_ROTATION = 1_000_000  # rotated copies carry index + k * 1e6 (VLMEvalKit)


def _pct(correct: float, total: int) -> float:
    return 100.0 * correct / total if total else 0.0


def score_mme(records: list[dict]) -> dict:
    """Per subtask acc + acc+ (share of images with both questions right), 0..200."""
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        right = parse_mme(r["prediction"]) == str(r["answer"]).strip().lower()
        by_task[r["category"]][str(r["image"])].append(right)
    out: dict[str, float] = {}
    for task, images in by_task.items():
        for image, marks in images.items():
            if len(marks) != 2:  # acc+ is defined on question pairs
                raise BunnyError(f"mme: image {image!r} of {task!r} has {len(marks)} "
                                 f"questions; MME pairs exactly 2 per image")
        flat = [m for marks in images.values() for m in marks]
        acc = _pct(sum(flat), len(flat))
        acc_plus = _pct(sum(all(m) for m in images.values()), len(images))
        out[task] = acc + acc_plus
    result = {
        "perception": sum(out.get(t, 0.0) for t in MME_PERCEPTION),
        "cognition": sum(out.get(t, 0.0) for t in MME_COGNITION),
    }
    result.update({t: out[t] for t in MME_PERCEPTION + MME_COGNITION if t in out})
    return result


def _pope_split(records: list[dict]) -> dict:
    tp = fp = tn = fn = 0
    for r in records:
        pred_yes = parse_pope(r["prediction"]) == "yes"
        gold_yes = str(r["answer"]).strip().lower() == "yes"
        tp += pred_yes and gold_yes
        fp += pred_yes and not gold_yes
        tn += (not pred_yes) and (not gold_yes)
        fn += (not pred_yes) and gold_yes
    # The reference divides by zero on degenerate splits; 0.0 is reported instead.
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(records)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n}


def score_pope(records: list[dict]) -> dict:
    """Per category accuracy, precision, recall, F1, yes-ratio (fractions); mean F1."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["category"]].append(r)
    out: dict = {c: _pope_split(groups[c]) for c in POPE_CATEGORIES if c in groups}
    out["f1_mean"] = sum(v["f1"] for v in out.values()) / len(out) if out else 0.0
    return out


def score_vqav2(records: list[dict]) -> dict:
    """EvalAI-processed prediction, official VQA accuracy, averaged (in %)."""
    total = sum(vqa_accuracy(normalize_vqa_answer(r["prediction"]), list(r["answers"]))
                for r in records)
    return {"accuracy": _pct(total, len(records))}


def score_gqa(records: list[dict]) -> dict:
    correct = sum(parse_gqa(r["prediction"]) == r["answer"] for r in records)
    return {"accuracy": _pct(correct, len(records))}


def score_seed(records: list[dict]) -> dict:
    """Exact letter; over all questions and over the image questions only."""
    marks = [(r["data_type"], parse_seed(r["prediction"]) == r["answer"]) for r in records]
    image = [m for t, m in marks if t == "image"]
    return {"accuracy": _pct(sum(m for _, m in marks), len(marks)),
            "accuracy_image": _pct(sum(image), len(image))}


def score_scienceqa(records: list[dict], reference_fallback: bool = False,
                    seed: int = 0) -> dict:
    """Accuracy (in %), `unparseable`: answers the official rules read no letter from (what
    eval_science_qa.py marks FAILED), and `out_of_choices`: a letter read that names no
    choice. Both count wrong.

    LLaVA's original script drew a random choice for either instead, which
    `reference_fallback=True` reproduces with `random.Random(seed)`.
    """
    rng = random.Random(seed)
    correct = unparseable = out_of_choices = 0
    for r in records:
        n = len(r["choices"])
        letter = parse_scienceqa_letter(r["prediction"])
        idx = OPTION_LETTERS.index(letter) if letter in OPTION_LETTERS[:n] else None
        unparseable += letter is None
        out_of_choices += letter is not None and idx is None
        if idx is None and reference_fallback:
            idx = rng.choice(range(n))
        correct += idx is not None and chr(ord("A") + idx) == r["answer"]
    return {"accuracy": _pct(correct, len(records)), "unparseable": unparseable, "out_of_choices": out_of_choices}


def mmbench_choices(record: dict) -> dict[str, str]:
    """Letters with an option text (A..D), stopping at the first missing one."""
    out = {}
    for letter in "ABCD":
        value = record.get(letter)
        if value is None or (isinstance(value, float) and value != value) or \
                (isinstance(value, str) and value.strip().lower() in ("nan", "none")):
            break
        out[letter] = str(value)
    return out


def score_mmbench(records: list[dict]) -> dict:
    """Circular accuracy: a question counts only if every rotation of it is right."""
    groups: dict[int, list[bool]] = defaultdict(list)
    unparseable = 0
    for r in records:
        letter = parse_mmbench(r["prediction"], mmbench_choices(r))
        unparseable += letter is None
        groups[int(r["index"]) % MMBENCH_ROTATION].append(letter == r["answer"])
    correct = sum(all(marks) for marks in groups.values())
    return {"circular_accuracy": _pct(correct, len(groups)), "unparseable": unparseable}


def score_mmmu(records: list[dict], reference_fallback: bool = False, seed: int = 0) -> dict:
    """Official MMMU judging, micro-averaged over questions (in %).

    Unparseable multiple-choice answers count wrong and are reported; with
    `reference_fallback=True` a letter is drawn with `random.Random(seed)` as the
    official parser does (in record order).
    """
    rng = random.Random(seed)
    correct = unparseable = 0
    for r in records:
        if r["question_type"] == "multiple-choice":
            options = [str(o) for o in r["options"]]
            letter, parsed = mmmu_rules.choose_letter(r["prediction"], options, rng, reference_fallback)
            unparseable += not parsed
            correct += mmmu_rules.judge_multi_choice(r["answer"], letter)
        else:
            correct += mmmu_rules.judge_open(r["answer"], mmmu_rules.parse_open(r["prediction"]))
    return {"accuracy": _pct(correct, len(records)), "unparseable": unparseable}
