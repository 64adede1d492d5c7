"""Question text per benchmark, as the reference's eval scripts build it.

Pure functions: a sample (a dict from datasets.py) -> (text, image references). The text
excludes the image placeholder; the chat template puts "<image>\n" in front of it, as
the reference does. Image references are whatever the sample holds (parquet image
structs or PIL images); `datasets.decode_image` turns one into a PIL image.
"""
from __future__ import annotations

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE = "\nAnswer with the option's letter from the given choices directly."
_MME_YES_NO = " Please answer yes or no."  # replaced by the short-answer suffix


def mme_prompt(sample: dict) -> tuple[str, list]:
    text = sample["question"].strip().replace(_MME_YES_NO, "")
    return text + SHORT_ANSWER, list(sample["images"])


def short_answer_prompt(sample: dict) -> tuple[str, list]:
    """POPE, VQAv2, GQA: the question, then the short-answer suffix."""
    return sample["question"].strip() + SHORT_ANSWER, list(sample["images"])


def scienceqa_prompt(sample: dict) -> tuple[str, list]:
    """"Context: {hint}\\n" (only with a hint), the question, "A. ..." lines, suffix."""
    context = f"Context: {sample['hint']}\n" if sample.get("hint") else ""
    options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(sample["choices"]))
    return f"{context}{sample['question']}\n{options}{MULTIPLE_CHOICE}", list(sample["images"])


def seed_prompt(sample: dict) -> tuple[str, list]:
    options = "\n".join(f"{letter}. {sample[letter]}" for letter in "ABCD")
    return f"{sample['question']}\n{options}{MULTIPLE_CHOICE}", list(sample["images"])


def mmbench_prompt(sample: dict) -> tuple[str, list]:
    """Hint line (when present), question, one "X. option" line per present option."""
    from bunny.eval.scorers import mmbench_choices

    text = sample["question"]
    if sample.get("hint"):
        text = f"{sample['hint']}\n{text}"
    for letter, option in mmbench_choices(sample).items():
        text += f"\n{letter}. {option}"
    return text + MULTIPLE_CHOICE, list(sample["images"])


def mmmu_prompt(sample: dict) -> tuple[str, list]:
    """MMMU config of the reference: "(A) option" lines, a blank line, the suffix.

    Only image_1 is passed (the reference is single-image); "<image 1>" markers stay in
    the text as the reference leaves them.
    """
    if sample["question_type"] == "multiple-choice":
        options = "".join(f"({chr(ord('A') + i)}) {o}\n" for i, o in enumerate(sample["options"]))
        text = f"{sample['question']}\n{options}{MULTIPLE_CHOICE}"
    else:
        text = sample["question"] + SHORT_ANSWER
    return text, list(sample["images"][:1])


PROMPT_BUILDERS = {
    "mme": mme_prompt,
    "pope": short_answer_prompt,
    "vqav2": short_answer_prompt,
    "gqa": short_answer_prompt,
    "scienceqa": scienceqa_prompt,
    "seed": seed_prompt,
    "mmbench": mmbench_prompt,
    "mmmu": mmmu_prompt,
}
# Greedy generation lengths of the reference scripts.
MAX_NEW_TOKENS = {name: 128 for name in PROMPT_BUILDERS} | {"scienceqa": 1024}


def build_prompt(benchmark: str, sample: dict) -> tuple[str, list]:
    from bunny.eval.registry import get_benchmark

    get_benchmark(benchmark)  # unknown names fail with the list of valid ones
    return PROMPT_BUILDERS[benchmark](sample)
