"""The benchmarks by exact name, and the one scoring entry point."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bunny.errors import BunnyError
from bunny.eval import scorers
from bunny.eval.records import load_predictions, validate_records


@dataclass(frozen=True)
class Benchmark:
    name: str
    score: Callable[..., dict]
    # True where the reference draws a random answer for unparseable output.
    has_random_fallback: bool = False


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("mme", scorers.score_mme),
    Benchmark("pope", scorers.score_pope),
    Benchmark("vqav2", scorers.score_vqav2),
    Benchmark("gqa", scorers.score_gqa),
    Benchmark("scienceqa", scorers.score_scienceqa, has_random_fallback=True),
    Benchmark("seed", scorers.score_seed),
    Benchmark("mmbench", scorers.score_mmbench),
    Benchmark("mmmu", scorers.score_mmmu, has_random_fallback=True),
)}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise BunnyError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def score_records(name: str, records: list[dict], reference_fallback: bool = False,
                  seed: int = 0) -> dict:
    """Validate in-memory prediction records and score them."""
    bench = get_benchmark(name)
    validate_records(name, records)
    return _score(bench, records, reference_fallback, seed)


def score_file(name: str, path: str | Path, reference_fallback: bool = False,
               seed: int = 0) -> dict:
    """Score a predictions JSONL file (the contract in docs/evaluation.md)."""
    bench = get_benchmark(name)
    return _score(bench, load_predictions(name, path), reference_fallback, seed)


def _score(bench: Benchmark, records: list[dict], reference_fallback: bool, seed: int) -> dict:
    if bench.has_random_fallback:
        metrics = bench.score(records, reference_fallback=reference_fallback, seed=seed)
        if reference_fallback:  # a random draw decided part of the score: say which
            metrics["fallback_seed"] = seed
        return metrics
    if reference_fallback:
        raise BunnyError(f"{bench.name}: the reference has no random fallback; "
                         f"--reference-fallback applies to "
                         f"{', '.join(b.name for b in BENCHMARKS.values() if b.has_random_fallback)}")
    return bench.score(records)
