"""Submission files for the splits that only an external server scores: VQAv2 test-dev and
test (EvalAI), MMBench test (the MMBench server / VLMEvalKit), MMMU test (EvalAI).

Pure: prediction records in, files out; no model, no torch.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from bunny.errors import BunnyError
from bunny.eval import mmmu_rules
from bunny.eval.vqa_normalize import normalize_vqa_answer

# Splits without public answers, per benchmark (hub split names).
SERVER_SPLITS: dict[str, tuple[str, ...]] = {
    "vqav2": ("testdev", "test"),
    "mmbench": ("test",),
    "mmmu": ("test",),
}
_GROUND_TRUTH = {"vqav2": "answers", "mmbench": "answer", "mmmu": "answer"}
MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "prediction")


def needs_server(benchmark: str, split: str | None, samples: list[dict]) -> bool:
    """True for a server-scored split, or for data of such a benchmark without answers."""
    if benchmark not in SERVER_SPLITS:
        return False
    if split in SERVER_SPLITS[benchmark]:
        return True
    field = _GROUND_TRUTH[benchmark]
    return bool(samples) and all(_missing(s.get(field)) for s in samples)


def _missing(value) -> bool:
    return value is None or value == [] or (isinstance(value, str) and value.strip() in ("", "?"))


def write_submission(benchmark: str, records: list[dict], samples: list[dict], out_stem: Path,
                     reference_fallback: bool = False, seed: int = 0) -> tuple[list[Path], dict]:
    """Write the server's format next to `out_stem`; returns (files, info for the results)."""
    if benchmark == "vqav2":
        return _vqav2(records, out_stem)
    if benchmark == "mmbench":
        return _mmbench(records, samples, out_stem)
    if benchmark == "mmmu":
        return _mmmu(records, out_stem, reference_fallback, seed)
    raise BunnyError(f"{benchmark} has no server split; valid: {', '.join(SERVER_SPLITS)}")


def _vqav2(records, out_stem):
    """EvalAI: a JSON list of {question_id, answer}, answers through the EvalAI processor
    (as the reference's convert_vqav2_for_submission does)."""
    rows = [{"question_id": r["question_id"], "answer": normalize_vqa_answer(r["prediction"])}
            for r in records]
    path = out_stem.with_name(out_stem.name + ".submission.json")
    path.write_text(json.dumps(rows) + "\n", encoding="utf-8")
    return [path], {"format": "EvalAI VQAv2 results JSON", "questions": len(rows)}


def _mmbench(records, samples, out_stem):
    """VLMEvalKit's table: one row per question (rotations included, index >= 1e6), the raw
    prediction in `prediction`. TSV always; xlsx too where an Excel writer is installed."""
    by_id = {json.dumps(s["question_id"]): s for s in samples}
    rows = []
    for r in records:
        s = by_id[json.dumps(r["question_id"])]
        row = {c: s.get(c) for c in MMBENCH_COLUMNS[:-1]}
        row["prediction"] = r["prediction"]
        rows.append(row)
    tsv = out_stem.with_name(out_stem.name + ".submission.tsv")
    with tsv.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MMBENCH_COLUMNS, delimiter="\t")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    files, info = [tsv], {"format": "VLMEvalKit MMBench table", "questions": len(rows)}
    xlsx = _try_xlsx(rows, out_stem.with_name(out_stem.name + ".submission.xlsx"))
    if xlsx is None:
        info["note"] = ("no Excel writer (openpyxl / xlsxwriter) installed: only the TSV was "
                        "written; open it in a spreadsheet and save as .xlsx for the server")
    else:
        files.append(xlsx)
    return files, info


def _try_xlsx(rows, path):
    try:
        import pandas as pd
    except ImportError:
        return None
    for engine in ("openpyxl", "xlsxwriter"):
        try:
            __import__(engine)
        except ImportError:
            continue
        pd.DataFrame(rows, columns=list(MMBENCH_COLUMNS)).to_excel(path, index=False, engine=engine)
        return path
    return None


def _mmmu(records, out_stem, reference_fallback, seed):
    """EvalAI: a JSON dict id -> answer; multiple choice as the parsed letter, open questions
    as the raw text (the official main_generate's output)."""
    rng = random.Random(seed)
    answers, unparseable = {}, 0
    for r in records:
        if r["question_type"] == "multiple-choice":
            options = [str(o) for o in r["options"]]
            letter, parsed = mmmu_rules.choose_letter(r["prediction"], options, rng, reference_fallback)
            unparseable += not parsed
            answers[r["question_id"]] = letter if letter is not None else r["prediction"]
        else:
            answers[r["question_id"]] = r["prediction"]
    path = out_stem.with_name(out_stem.name + ".submission.json")
    path.write_text(json.dumps(answers, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    info = {"format": "EvalAI MMMU answers JSON", "questions": len(answers), "unparseable": unparseable}
    if reference_fallback:
        info["fallback_seed"] = seed
    return [path], info
