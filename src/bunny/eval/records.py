"""The prediction file contract: one JSON object per line, checked field by field.

Every benchmark needs `question_id` and `prediction`, plus its own fields (see
`REQUIRED_FIELDS`). Bad input fails loudly with the line number and the field at fault.
"""
from __future__ import annotations

import json
from pathlib import Path

from bunny.errors import BunnyError
from bunny.eval.scorers import MME_COGNITION, MME_PERCEPTION, POPE_CATEGORIES

COMMON_FIELDS = ("question_id", "prediction")
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "mme": ("answer", "category", "image"),
    "pope": ("answer", "category"),
    "vqav2": ("answers",),
    "gqa": ("answer",),
    "scienceqa": ("answer", "choices"),
    "seed": ("answer", "data_type"),
    "mmbench": ("answer", "index", "A", "B"),
    "mmmu": ("answer", "question_type", "options"),
}
# Fields whose value must be one of a closed set of names.
ALLOWED_VALUES: dict[str, dict[str, tuple[str, ...]]] = {
    "mme": {"category": MME_PERCEPTION + MME_COGNITION, "answer": ("Yes", "No", "yes", "no")},
    "pope": {"category": POPE_CATEGORIES, "answer": ("yes", "no", "Yes", "No")},
    "seed": {"data_type": ("image", "video")},
    "mmmu": {"question_type": ("multiple-choice", "open")},
}
_LIST_FIELDS = ("answers", "choices", "options")


def validate_record(benchmark: str, record: object, where: str) -> dict:
    """Check one record against the contract of `benchmark`; `where` names it in errors."""
    if not isinstance(record, dict):
        raise BunnyError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in COMMON_FIELDS + REQUIRED_FIELDS[benchmark]:
        if field not in record or record[field] is None:
            raise BunnyError(f"{where}: missing field {field!r} (benchmark {benchmark})")
    if not isinstance(record["prediction"], str):
        raise BunnyError(f"{where}: field 'prediction' must be a string")
    for field in _LIST_FIELDS:
        if field in REQUIRED_FIELDS[benchmark] and not isinstance(record[field], list):
            raise BunnyError(f"{where}: field {field!r} must be a list")
    if benchmark == "vqav2" and not record["answers"]:
        raise BunnyError(f"{where}: field 'answers' is empty")
    for field, allowed in ALLOWED_VALUES.get(benchmark, {}).items():
        if record[field] not in allowed:
            raise BunnyError(f"{where}: unknown {field} {record[field]!r}; "
                             f"valid: {', '.join(allowed)}")
    return record


def check_unique_ids(benchmark: str, records: list[dict], names: list[str]) -> None:
    seen: dict[object, str] = {}
    for record, where in zip(records, names):
        qid = record["question_id"]
        key = json.dumps(qid, sort_keys=True)
        if key in seen:
            raise BunnyError(f"{where}: duplicate question_id {qid!r} (first at {seen[key]})")
        seen[key] = where


def validate_records(benchmark: str, records: list[dict]) -> list[dict]:
    """Validate in-memory records (for Python callers); errors name the record index."""
    names = [f"record {i}" for i in range(len(records))]
    for record, where in zip(records, names):
        validate_record(benchmark, record, where)
    check_unique_ids(benchmark, records, names)
    return records


def load_predictions(benchmark: str, path: str | Path) -> list[dict]:
    """Read and validate a predictions JSONL file (blank lines are allowed)."""
    path = Path(path)
    if not path.is_file():
        raise BunnyError(f"predictions file not found: {path}")
    records, names = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BunnyError(f"{where}: not valid JSON ({exc.msg})") from None
            records.append(validate_record(benchmark, record, where))
            names.append(where)
    if not records:
        raise BunnyError(f"{path}: no predictions")
    check_unique_ids(benchmark, records, names)
    return records
