"""Readers for the benchmarks as published on the Hugging Face hub (parquet), from a local
directory: lmms-lab/MME, POPE, GQA, VQAv2, ScienceQA, SEED-Bench, MMBench and MMMU/MMMU.

Each reader turns parquet rows into samples: flat dicts holding the prediction-file fields
of records.py (question_id, answer, category, ...) plus what prompts.py needs (question,
hint, images). Images stay as stored (parquet structs) until `decode_image`.
"""
from __future__ import annotations

import ast
import io
import math
from pathlib import Path

from bunny.errors import BunnyError
from bunny.eval.records import REQUIRED_FIELDS
from bunny.eval.registry import get_benchmark
from bunny.eval.scorers import MMBENCH_ROTATION

# Columns each benchmark's rows must have (lmms-eval's task files read the same ones).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "mme": ("question_id", "image", "question", "answer", "category"),
    "pope": ("question_id", "image", "question", "answer", "category"),
    "vqav2": ("question_id", "image", "question"),
    "gqa": ("id", "imageId", "question", "answer"),
    "scienceqa": ("image", "question", "choices", "answer", "hint"),
    "seed": ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d",
             "answer", "data_type", "image"),
    "mmbench": ("index", "question", "hint", "A", "B", "image"),
    "mmmu": ("id", "question", "options", "answer", "question_type", "image_1"),
}
GQA_IMAGE_COLUMNS = ("id", "image")  # the separate testdev_balanced_images config


def decode_image(ref):
    """A parquet image struct ({"bytes", "path"}), raw bytes or a PIL image -> RGB PIL."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    data = ref.get("bytes") if isinstance(ref, dict) else ref
    if data is None and isinstance(ref, dict) and ref.get("path"):
        return Image.open(ref["path"]).convert("RGB")
    if not isinstance(data, (bytes, bytearray)):
        raise BunnyError(f"cannot decode image reference of type {type(ref).__name__}")
    return Image.open(io.BytesIO(data)).convert("RGB")


def _parquet_files(path: Path, split: str | None) -> list[Path]:
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise BunnyError(f"no parquet files under {path}")
    if split is None:
        return files
    chosen = [f for f in files if f.name.startswith(f"{split}-") or f.stem == split]
    if not chosen:
        found = sorted({f.name.split("-")[0] for f in files})
        raise BunnyError(f"no parquet file of split {split!r} under {path}; "
                         f"found: {', '.join(found)}")
    return chosen


def _read_tables(path: Path, split: str | None) -> list[tuple[Path, list[dict], set[str]]]:
    import pyarrow.parquet as pq

    out = []
    for f in _parquet_files(path, split):
        table = pq.read_table(f)
        out.append((f, table.to_pylist(), set(table.column_names)))
    return out


def _require(columns: set[str], needed: tuple[str, ...], where: Path, name: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise BunnyError(f"{where}: not a {name} dataset; missing columns: "
                         f"{', '.join(missing)}")


def _is_none(value) -> bool:
    """MMBench's notion of an absent hint/option: None, NaN, "nan", "none"."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("nan", "none")


def read_benchmark(name: str, path: str | Path, split: str | None = None,
                   circular: bool = True) -> list[dict]:
    """Samples of benchmark `name` from local parquet files (a file or a directory).

    `split` keeps files named "{split}-*.parquet" (the hub layout). For MMBench,
    `circular` adds the rotated copies the circular score needs (index + k * 1e6).
    """
    get_benchmark(name)
    path = Path(path)
    if not path.exists():
        raise BunnyError(f"dataset path not found: {path}")
    tables = _read_tables(path, split)
    if name == "gqa":
        return _gqa(tables)
    rows = []
    for f, table_rows, columns in tables:
        _require(columns, REQUIRED_COLUMNS[name], f, name)
        rows.extend(table_rows)
    samples = _CONVERTERS[name](rows)
    if name == "mmbench" and circular:
        samples = [s for base in samples for s in mmbench_rotations(base)]
    return samples


def _mme(rows):
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        k = seen.get(r["question_id"], 0)  # MME's id names the image; two questions share it
        seen[r["question_id"]] = k + 1
        out.append({"question_id": f"{r['question_id']}#{k}", "image": r["question_id"],
                    "category": r["category"], "answer": r["answer"],
                    "question": r["question"], "images": [r["image"]]})
    return out


def _pope(rows):
    return [{"question_id": r["question_id"], "category": r["category"], "answer": r["answer"],
             "question": r["question"], "images": [r["image"]]} for r in rows]


def _vqav2(rows):
    out = []
    for r in rows:
        answers = r.get("answers")
        if answers is not None:  # test splits carry no answers
            answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
        out.append({"question_id": r["question_id"], "answers": answers,
                    "question": r["question"], "images": [r["image"]]})
    return out


def _gqa(tables):
    images: dict[str, object] = {}
    questions = []
    for f, rows, columns in tables:
        if "question" not in columns and set(GQA_IMAGE_COLUMNS) <= columns:
            images.update((r["id"], r["image"]) for r in rows)
        else:
            _require(columns, REQUIRED_COLUMNS["gqa"], f, "gqa")
            questions.extend(rows)
    if not images:
        raise BunnyError("gqa: no image table (columns id, image) found; GQA keeps images "
                         "in the testdev_balanced_images config, download it beside the "
                         "questions")
    out = []
    for r in questions:
        if r["imageId"] not in images:
            raise BunnyError(f"gqa: question {r['id']}: image {r['imageId']!r} not found")
        out.append({"question_id": r["id"], "answer": r["answer"], "question": r["question"],
                    "images": [images[r["imageId"]]]})
    return out


def _scienceqa(rows):
    out = []
    for i, r in enumerate(rows):  # the lmms-lab copy has no id column: file order is the id
        out.append({"question_id": i, "choices": list(r["choices"]),
                    "answer": chr(ord("A") + int(r["answer"])), "question": r["question"],
                    "hint": r["hint"] or "", "images": [] if r["image"] is None else [r["image"]]})
    return out


def _seed(rows):
    out = []
    for r in rows:
        frames = list(r["image"] or [])
        # The reference feeds one image: the picture, or the middle frame of a video.
        images = frames[len(frames) // 2:len(frames) // 2 + 1] if r["data_type"] == "video" \
            else frames[:1]
        out.append({"question_id": r["question_id"], "data_type": r["data_type"],
                    "answer": r["answer"], "question": r["question"], "images": images,
                    **{L: r[f"choice_{L.lower()}"] for L in "ABCD"}})
    return out


def _mmbench(rows):
    out = []
    for r in rows:
        sample = {"question_id": int(r["index"]), "index": int(r["index"]),
                  "answer": r.get("answer"), "question": r["question"],
                  "hint": None if _is_none(r["hint"]) else r["hint"], "images": [r["image"]]}
        for letter in "ABCD":
            value = r.get(letter)
            sample[letter] = None if _is_none(value) else value
        out.append(sample)
    return out


def mmbench_rotations(sample: dict) -> list[dict]:
    """The sample and its rotations as the reference builds them (options shift left by
    one each round, letters stay), with index + k * 1e6 and the answer letter moved."""
    letters = [L for L in "ABCD" if sample.get(L) is not None]
    texts = [sample[L] for L in letters]
    out = []
    for k in range(len(letters)):
        s = dict(sample)
        for i, L in enumerate(letters):
            s[L] = texts[(i + k) % len(letters)]
        if sample.get("answer") in letters:
            s["answer"] = letters[(letters.index(sample["answer"]) - k) % len(letters)]
        s["index"] = sample["index"] + k * MMBENCH_ROTATION
        s["question_id"] = s["index"]
        out.append(s)
    return out


def _mmmu_answer(value):
    # Some open answers are stored as a list literal, e.g. "['24', '24.0']".
    if isinstance(value, str) and value.startswith("["):
        try:
            parsed = ast.literal_eval(value)
            if isinstance(parsed, list):
                return [str(v) for v in parsed]
        except (ValueError, SyntaxError):
            pass
    return value


def _mmmu(rows):
    out = []
    for r in rows:
        options = r["options"]
        if isinstance(options, str):  # stored as a Python list literal
            options = ast.literal_eval(options)
        out.append({"question_id": r["id"], "question_type": r["question_type"],
                    "options": [str(o) for o in options], "answer": _mmmu_answer(r["answer"]),
                    "question": r["question"],
                    "images": [] if r["image_1"] is None else [r["image_1"]]})
    return out


_CONVERTERS = {"mme": _mme, "pope": _pope, "vqav2": _vqav2, "scienceqa": _scienceqa,
               "seed": _seed, "mmbench": _mmbench, "mmmu": _mmmu}


def prediction_record(benchmark: str, sample: dict, prediction: str) -> dict:
    """The JSONL line to write for `sample` once the model answered `prediction`."""
    fields = ("question_id",) + REQUIRED_FIELDS[benchmark] + \
        (("C", "D") if benchmark == "mmbench" else ())
    return {**{f: sample.get(f) for f in fields}, "prediction": prediction}
