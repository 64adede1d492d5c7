"""`bunny data mix`: a fine-tuning mixture from LLaVA-format sources with per-source rules.

Bunny-695K is SVIT-mix-665K with its ShareGPT-40K subset replaced by WizardLM-evol-
instruct-70K; ALLaVA questions get "Please answer the question in detail." appended.
A recipe (YAML) lists sources; each may:
  drop_ids_from: FILE   drop the samples whose id appears in FILE (JSON/JSONL, or a text
                        file of ids): "replace a subset" = drop it here, add the replacement
                        as another source
  drop_id_prefix: STR   drop samples whose id starts with STR
  suffix: STR           append to every human turn (after suffix_separator, default " ")
  cap: N                keep at most N samples, a seeded random subset in original order
  fraction: F           keep round(F * n) samples the same way
The rules are pure functions over records; `build_mixture` does the I/O and writes the
mixture plus OUT.report.json with counts per source.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from bunny.atomic import atomic_write
from bunny.data.llava import read_records
from bunny.errors import BunnyError


@dataclass
class Source:
    name: str
    path: str
    drop_ids_from: str = ""
    drop_id_prefix: str = ""
    suffix: str = ""
    suffix_separator: str = " "
    cap: int = 0
    fraction: float = 1.0


def drop_ids(records: list[dict], ids: set[str]) -> list[dict]:
    return [r for r in records if str(r.get("id")) not in ids]


def add_suffix(records: list[dict], suffix: str, separator: str = " ") -> list[dict]:
    """Copies of the records with `suffix` appended to every human turn."""
    out = []
    for r in records:
        turns = [dict(t, value=t["value"] + separator + suffix) if t.get("from") in ("human", "user") else dict(t)
                 for t in r["conversations"]]
        out.append({**r, "conversations": turns})
    return out


def subsample(records: list[dict], keep: int, seed: int, name: str) -> list[dict]:
    """A seeded random subset of `keep` records, in their original order."""
    if keep >= len(records):
        return list(records)
    chosen = sorted(random.Random(f"bunny-mix/{seed}/{name}").sample(range(len(records)), keep))
    return [records[i] for i in chosen]


def apply_rules(source: Source, records: list[dict], seed: int, drop: set[str] | None = None) -> tuple[list[dict], dict]:
    counts = {"read": len(records)}
    if drop:
        records = drop_ids(records, drop)
    if source.drop_id_prefix:
        records = [r for r in records if not str(r.get("id")).startswith(source.drop_id_prefix)]
    counts["dropped"] = counts["read"] - len(records)
    keep = len(records)
    if source.fraction < 1.0:
        keep = round(source.fraction * keep)
    if source.cap:
        keep = min(keep, source.cap)
    records = subsample(records, keep, seed, source.name)
    counts["sampled_out"] = counts["read"] - counts["dropped"] - len(records)
    if source.suffix:
        records = add_suffix(records, source.suffix, source.suffix_separator)
    counts["written"] = len(records)
    return records, counts


def read_ids(path: Path) -> set[str]:
    if path.suffix in (".json", ".jsonl"):
        return {str(r.get("id")) for r in read_records(path)}
    if not path.is_file():
        raise BunnyError(f"id file not found: {path}")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def load_mix_recipe(path: str | Path) -> tuple[list[Source], dict]:
    path = Path(path)
    if not path.is_file():
        raise BunnyError(f"mixture recipe not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    top = {"seed", "output", "shuffle", "sources"}
    unknown = set(spec) - top
    if unknown:
        raise BunnyError(f"{path}: unknown field(s) {sorted(unknown)}; valid: {sorted(top)}")
    if not spec.get("sources") or not spec.get("output"):
        raise BunnyError(f"{path}: a mixture needs 'output' and a list of 'sources'")
    valid = [f.name for f in fields(Source)]
    sources = []
    for i, s in enumerate(spec["sources"]):
        bad = set(s) - set(valid)
        if bad:
            raise BunnyError(f"{path}: source {i}: unknown field(s) {sorted(bad)}; valid: {valid}")
        if "name" not in s or "path" not in s:
            raise BunnyError(f"{path}: source {i} needs 'name' and 'path'")
        sources.append(Source(**s))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise BunnyError(f"{path}: source names must be unique, got {names}")
    base = path.parent
    for s in sources:  # relative paths are relative to the recipe file
        s.path = str(base / s.path)
        if s.drop_ids_from:
            s.drop_ids_from = str(base / s.drop_ids_from)
    settings = {"seed": int(spec.get("seed", 0)), "output": str(base / spec["output"]),
                "shuffle": bool(spec.get("shuffle", False))}
    return sources, settings


def build_mixture(recipe_path: str | Path) -> dict:
    sources, settings = load_mix_recipe(recipe_path)
    mixture, report, owner = [], {"seed": settings["seed"], "sources": {}}, {}
    for source in sources:
        drop = read_ids(Path(source.drop_ids_from)) if source.drop_ids_from else None
        records, counts = apply_rules(source, read_records(source.path), settings["seed"], drop)
        for r in records:
            rid = str(r.get("id"))
            if rid in owner:
                raise BunnyError(f"sample id {rid!r} appears in both {owner[rid]!r} and {source.name!r}")
            owner[rid] = source.name
        mixture += records
        report["sources"][source.name] = counts
    if settings["shuffle"]:
        random.Random(f"bunny-mix-shuffle/{settings['seed']}").shuffle(mixture)
    report["total"] = len(mixture)
    out = Path(settings["output"])
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(mixture, ensure_ascii=False)),
                       (out.with_name(out.stem + ".report.json"), json.dumps(report, indent=1))):
        atomic_write(path, text + "\n")
    report["output"] = str(out)
    return report
