"""`bunny eval run`: load a benchmark, answer it with a model, score it (or write the
server's submission file), and write the results as JSON and markdown.

Files in `out` (stem = BENCH, or BENCH-SPLIT when a split is given):
  {stem}.predictions.jsonl   the prediction-file contract (resumable)
  {stem}.run.json            what produced it (a resumed run must match)
  {stem}.results.json / .md  metrics, or the submission files for server splits
  {stem}.submission.*        server splits only
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bunny.errors import BunnyError
from bunny.eval.datasets import mmbench_rotations, read_benchmark
from bunny.eval.prompts import MAX_NEW_TOKENS
from bunny.eval.registry import get_benchmark, score_records
from bunny.eval.scorers import MMBENCH_ROTATION
from bunny.eval.submission import needs_server, write_submission

# Where the reference's numbers come from on the hub: (repo id, default split, files to fetch).
HUB_SOURCES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mme": ("lmms-lab/MME", "test", ("*test-*.parquet",)),
    "pope": ("lmms-lab/POPE", "test", ("*test-*.parquet",)),
    "vqav2": ("lmms-lab/VQAv2", "testdev", ("*testdev-*.parquet",)),
    "gqa": ("lmms-lab/GQA", "testdev",
            ("testdev_balanced_instructions/*", "testdev_balanced_images/*")),
    "scienceqa": ("lmms-lab/ScienceQA", "test", ("ScienceQA-IMG/*test-*.parquet",)),
    "seed": ("lmms-lab/SEED-Bench", "test", ("*test-*.parquet",)),
    "mmbench": ("lmms-lab/MMBench", "dev", ("en/*dev-*.parquet",)),
    "mmmu": ("MMMU/MMMU", "validation", ("*validation-*.parquet",)),
}
# Settings that must match when a run resumes an existing predictions file.
_RESUME_KEYS = ("benchmark", "model", "revision", "split", "max_new_tokens", "engine", "quantize", "dtype")


@dataclass
class RunResult:
    benchmark: str
    split: str | None
    model: str
    data: str
    questions: int
    generated: int  # answered in this call (the rest came from the predictions file)
    seconds: float
    max_new_tokens: int
    batch_size: int
    metrics: dict | None = None  # None for server splits
    submission: dict | None = None  # server splits: format, files, counts
    files: dict = field(default_factory=dict)
    # --compile: "BATCHxCACHE" -> seconds of the compiling first call, for the shapes this
    # process compiled (paid once per process; included in `seconds`)
    compiled: dict | None = None
    quantize: str | None = None  # "int8", "int4/g64", ...: the torch engine's weight quantisation
    dtype: str | None = None  # "bfloat16", ...: the weights' dtype when the run chose one (None: the checkpoint's)

    @property
    def questions_per_second(self) -> float | None:
        return round(self.generated / self.seconds, 3) if self.generated and self.seconds else None


def resolve_data(benchmark: str, data: str | None, split: str | None) -> tuple[Path, str | None]:
    """A local file/folder, or a hub dataset id fetched with huggingface_hub."""
    repo, default_split, patterns = HUB_SOURCES[benchmark]
    if data is not None and Path(data).exists():
        return Path(data), split
    if data is not None and ("/" not in data or data.startswith((".", "/"))):
        raise BunnyError(f"dataset path not found: {data}")
    repo_id = data or repo
    split = split or (default_split if repo_id == repo else None)
    if repo_id != repo:
        patterns = (f"*{split}-*.parquet",) if split else ("*.parquet",)
    return download_dataset(repo_id, patterns), split


def download_dataset(repo_id: str, patterns: tuple[str, ...]) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise BunnyError(f"--data {repo_id} is a hub id, but huggingface_hub is not installed; "
                         f"pip install huggingface_hub, or pass a local folder of parquet files") from None
    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=list(patterns)))
    except Exception as exc:  # offline, unknown repo, gated: all mean "no data here"
        raise BunnyError(f"cannot download dataset {repo_id} from the Hugging Face hub "
                         f"({type(exc).__name__}: {exc}); download it elsewhere and pass the "
                         f"local folder with --data") from None


def load_samples(benchmark: str, path: Path, split: str | None) -> list[dict]:
    """read_benchmark, except that MMBench data already holding its rotations
    (index >= 1e6, as VLMEvalKit's tables do) is not rotated a second time."""
    if benchmark != "mmbench":
        return read_benchmark(benchmark, path, split)
    samples = read_benchmark(benchmark, path, split, circular=False)
    if any(s["index"] >= MMBENCH_ROTATION for s in samples):
        return samples
    return [r for s in samples for r in mmbench_rotations(s)]


def run_benchmark(benchmark: str, model: str, data: str | None = None, split: str | None = None,
                  limit: int | None = None, batch_size: int = 1, out: str | Path = "outputs/eval",
                  max_new_tokens: int | None = None, reference_fallback: bool = False, seed: int = 0,
                  device: str = "cpu", progress: bool = True, loaded=None, share_prefix: bool = False,
                  revision: str | None = None, engine: str = "torch", compile: bool = False,
                  quantize: str | None = None, group_size: int | None = None,
                  dtype: str | None = None) -> RunResult:
    """Evaluate `model` (a checkpoint folder, hub id at `revision`, or embedded name) on `benchmark`.

    `loaded` = (model, processor) skips loading (Python callers, tests, benchmarks);
    `model` then only names it in the outputs. `engine` ("torch" or "llama.cpp") names what
    answers; a run resumes only with the engine that wrote its predictions. `compile`: the
    torch engine decodes with a static cache and a compiled step (same greedy answers; a run
    may resume with or without it); the seconds each compiled shape took are in
    `RunResult.compiled`. `quantize` / `group_size`: the torch engine's model is quantised
    (`bunny.serve.quantize`; "int8", "int8/g32", ... in the run's settings, and a run resumes
    only with the same quantisation). `dtype` ("float32", "bfloat16", "float16"): the weights' dtype
    of a model it loads (default: the checkpoint's; bfloat16 refused on a CPU without native bf16,
    `bunny.model.dtypes`); with the llama.cpp engine, the dtype of the export `loaded` runs (recorded
    only). A run resumes only with the same dtype.
    """
    from bunny.eval.predict import count_pending, predict

    get_benchmark(benchmark)
    if limit is not None and limit < 1:
        raise BunnyError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise BunnyError(f"batch size must be at least 1, got {batch_size}")
    path, split = resolve_data(benchmark, data, split)
    all_samples = load_samples(benchmark, path, split)
    if not all_samples:
        raise BunnyError(f"{path}: no {benchmark} questions found")
    samples = all_samples[:limit] if limit else all_samples
    server = needs_server(benchmark, split, samples)
    if reference_fallback and not get_benchmark(benchmark).has_random_fallback:
        raise BunnyError(f"{benchmark}: the reference has no random fallback; "
                         f"--reference-fallback applies to scienceqa, mmmu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"{benchmark}-{split}" if split else benchmark)
    new_tokens = max_new_tokens or MAX_NEW_TOKENS[benchmark]
    settings = {"benchmark": benchmark, "model": str(model), "revision": revision, "split": split,
                "data": str(data or path), "max_new_tokens": new_tokens, "engine": engine, "compile": compile,
                "quantize": None, "dtype": dtype}
    if dtype is not None:
        from bunny.model.dtypes import DTYPES, check_dtype

        if dtype not in DTYPES:
            raise BunnyError(f"run_benchmark: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if engine == "torch":
            if loaded is not None:
                raise BunnyError("run_benchmark: dtype applies to a model it loads; convert a `loaded` model "
                                 "yourself")
            check_dtype(dtype, device)
    if quantize or group_size:
        from bunny.serve.quantize import check_request, describe

        if loaded is not None:
            raise BunnyError("run_benchmark: quantize applies to a model it loads; quantise a `loaded` model "
                             "yourself (bunny.serve.quantize.quantize_model)")
        check_request(quantize, group_size)
        settings["quantize"] = describe(quantize, group_size)
    _check_resume(stem.with_name(stem.name + ".run.json"), settings)

    if loaded is None:
        import torch

        from bunny.serve.quantize import load_quantized

        loaded = load_quantized(model, quantize, group_size, device, revision=revision,
                                dtype=getattr(torch, dtype) if dtype else None)
    net, processor = loaded
    predictions = stem.with_name(stem.name + ".predictions.jsonl")
    generated = count_pending(predictions, samples)
    started = time.perf_counter()
    records = predict(benchmark, samples, net, processor, predictions, batch_size=batch_size,
                      max_new_tokens=new_tokens, all_samples=all_samples, progress=progress,
                      share_prefix=share_prefix, compile=compile)
    seconds = time.perf_counter() - started

    result = RunResult(benchmark, split, str(model), settings["data"], len(samples), generated,
                       round(seconds, 3), new_tokens, batch_size,
                       files={"predictions": str(predictions)}, compiled=_compiled(net) if compile else None,
                       quantize=settings["quantize"], dtype=dtype)
    if server:
        files, info = write_submission(benchmark, records, samples, stem, reference_fallback, seed)
        result.submission = info | {"files": [str(f) for f in files]}
    else:
        result.metrics = score_records(benchmark, records, reference_fallback=reference_fallback, seed=seed)
    write_results(result, stem)
    return result


def _compiled(net) -> dict:
    from bunny.model.decode_static import compiled_shapes

    return {f"{b}x{length}": round(s, 3) for (b, length), s in compiled_shapes(net.language_model).items()}


def _check_resume(run_file: Path, settings: dict) -> None:
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        previous.setdefault("engine", "torch")  # run files written before the engine choice existed
        previous.setdefault("quantize", None)  # or before quantised evaluation
        previous.setdefault("dtype", None)  # or before the dtype choice
        changed = [k for k in _RESUME_KEYS if previous.get(k) != settings[k]]
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise BunnyError(f"{run_file.parent} holds predictions of another run ({details}); "
                             f"use another --out or remove {run_file.name} and the predictions")
    run_file.write_text(json.dumps(settings, indent=2) + "\n")


def write_results(result: RunResult, stem: Path) -> None:
    json_path = stem.with_name(stem.name + ".results.json")
    md_path = stem.with_name(stem.name + ".results.md")
    result.files |= {"results_json": str(json_path), "results_md": str(md_path)}
    payload = asdict(result) | {"questions_per_second": result.questions_per_second}
    json_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    md_path.write_text(results_markdown(result))


def results_markdown(result: RunResult) -> str:
    title = f"# {result.benchmark}" + (f" ({result.split})" if result.split else "")
    lines = [title, "", f"model: `{result.model}`  ", f"data: `{result.data}`  ",
             f"questions: {result.questions}, max_new_tokens: {result.max_new_tokens}, "
             f"batch size: {result.batch_size}" + (f", quantised: {result.quantize}" if result.quantize else "")
             + (f", dtype: {result.dtype}" if result.dtype else ""), ""]
    if result.metrics is not None:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in flatten_metrics(result.metrics)]
    else:
        info = result.submission or {}
        lines += [f"Scored only by the external server: submit {', '.join(info.get('files', []))} "
                  f"({info.get('format')})."]
        if info.get("note"):
            lines += ["", info["note"]]
    return "\n".join(lines) + "\n"


def flatten_metrics(metrics: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in metrics.items():
        if isinstance(v, dict):
            rows += flatten_metrics(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
