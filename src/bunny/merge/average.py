"""Weighted model averaging (paper, Tab. 10-11: Bunny-4B = 0.3 * M1 + 0.7 * M2), streamed.

Every tensor of the output is sum_i w_i * M_i[tensor], computed in float32 (float64 for
float64 tensors) and stored in the last model's dtype. Tensors are read one at a time, in
pieces of at most `chunk_size` bytes, and written straight into safetensors shards
(`safetensors_io.ShardWriter`), so an 8B merge needs memory for a few pieces, not for the
models, nor even for one output shard. As in the
reference, everything that is not a weight (config, tokenizer, processor) comes from the
last model; the config fields that decide the architecture must agree across models.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from bunny.atomic import atomic_folder, check_output_folder
from bunny.errors import BunnyError
from bunny.merge.safetensors_io import INDEX_FILE, SINGLE_FILE, ShardWriter, checkpoint_tensors, chunk_rows, plan_shards

RECORD_FILE = "merge_record.json"
MAX_LISTED = 10
# Saved by transformers for bookkeeping; equal models differ in them.
BOOKKEEPING = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash", "architectures"}
# BunnyConfig fields that change no tensor: taken from the last model, differences recorded.
NON_ARCHITECTURAL = {"template", "image_aspect_ratio", "tokenizer_padding_side", "tokenizer_model_max_length",
                     "vision_tower", "projector_trained"}
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '4096' -> bytes."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    s = text.strip().upper()
    for unit, factor in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise BunnyError(f"cannot read the size {text!r}; write e.g. 2GB or 500MB") from None


def check_weights(weights: list[float], n_models: int, allow_unnormalized: bool) -> None:
    if n_models < 2:
        raise BunnyError(f"averaging needs at least two models, got {n_models}")
    if len(weights) != n_models:
        raise BunnyError(f"got {len(weights)} weights for {n_models} models; give one weight per model")
    if not all(math.isfinite(w) for w in weights):
        raise BunnyError(f"weights must be finite numbers, got {weights}")
    total = sum(weights)
    if not allow_unnormalized and abs(total - 1.0) > 1e-6:
        raise BunnyError(f"weights {weights} sum to {total:g}, not 1; pass --allow-unnormalized if that is intended")


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if key in BOOKKEEPING:
            continue
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(configs: list[dict], names: list[str]) -> tuple[list[str], list[str]]:
    """(architecture mismatches, non-architectural differences), as readable lines."""
    flat = [_flatten(c) for c in configs]
    mismatches, others = [], []
    for key in sorted(set().union(*flat)):
        values = [f.get(key, "<missing>") for f in flat]
        if all(v == values[0] for v in values):
            continue
        line = f"config {key}: " + ", ".join(f"{n}={v!r}" for n, v in zip(names, values))
        (others if key in NON_ARCHITECTURAL else mismatches).append(line)
    return mismatches, others


def tensor_differences(tables: list[dict], names: list[str]) -> list[str]:
    problems = []
    first = tables[0]
    for name, table in zip(names[1:], tables[1:]):
        for key in sorted(set(first) - set(table)):
            problems.append(f"tensor {key}: in {names[0]} but not in {name}")
        for key in sorted(set(table) - set(first)):
            problems.append(f"tensor {key}: in {name} but not in {names[0]}")
        for key in sorted(set(first) & set(table)):
            if first[key].shape != table[key].shape:
                problems.append(f"tensor {key}: shape {list(first[key].shape)} in {names[0]}, "
                                f"{list(table[key].shape)} in {name}")
    return problems


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise BunnyError(f"{folder} holds no config.json; not a model checkpoint")
    return json.loads(path.read_text())


def _merged_pieces(name: str, infos: list, weights: list[float], chunk_bytes: int):
    """The weighted sum of tensor `name`, yielded in pieces along its first dimension, so
    that memory holds a few pieces (default 64 MB each), never whole tensors of every model."""
    out_dtype = infos[-1].dtype
    with contextlib.ExitStack() as stack:
        # Each file is opened for this tensor only: its memory map (and the input pages it
        # made resident) is released before the next tensor.
        slices = [stack.enter_context(safe_open(str(i.file), framework="pt")).get_slice(name) for i in infos]
        if not infos[-1].shape:  # a scalar has no first dimension to cut along
            ranges = [None]
        else:
            step = chunk_rows(infos[-1], chunk_bytes)
            ranges = [slice(a, min(a + step, infos[-1].shape[0])) for a in range(0, infos[-1].shape[0], step)]
        for rows in ranges:
            parts = [s[:] if rows is None else s[rows] for s in slices]
            if not out_dtype.is_floating_point:
                # Integer buffers (ids, counters) have no meaningful average: they must agree.
                if not all(torch.equal(p, parts[-1]) for p in parts):
                    raise BunnyError(f"tensor {name} has dtype {out_dtype} and differs between models; "
                                     "it cannot be averaged")
                yield parts[-1]
                continue
            acc_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
            acc = None
            for part, w in zip(parts, weights):
                part = part.to(acc_dtype)
                acc = part.mul_(w) if acc is None else acc.add_(part, alpha=w)
            del parts
            yield acc.to(out_dtype)


def average_models(
    models: list[str | os.PathLike],
    weights: list[float],
    out: str | os.PathLike,
    allow_unnormalized: bool = False,
    max_shard_size: str | int = "2GB",
    chunk_size: str | int = "64MB",
) -> Path:
    """Write sum_i weights[i] * models[i] (every tensor) to `out`; config etc. from the last model."""
    check_output_folder(out)
    folders = [Path(m) for m in models]
    check_weights(list(weights), len(folders), allow_unnormalized)
    names = [str(f) for f in folders]
    for f in folders:
        if not f.is_dir():
            raise BunnyError(f"model folder not found: {f}")
    configs = [_read_config(f) for f in folders]
    mismatches, others = config_differences(configs, names)
    tables = [checkpoint_tensors(f) for f in folders]
    mismatches += tensor_differences(tables, names)
    if mismatches:
        more = f" (and {len(mismatches) - MAX_LISTED} more)" if len(mismatches) > MAX_LISTED else ""
        raise BunnyError("the models do not share one architecture, so they cannot be averaged:\n  "
                         + "\n  ".join(mismatches[:MAX_LISTED]) + more)

    keys = sorted(tables[-1])
    sizes = {k: tables[-1][k].nbytes for k in keys}
    shards = plan_shards(keys, sizes, parse_size(max_shard_size))
    out = Path(out)
    with atomic_folder(out, protect_others=True) as tmp:
        weight_map = _write_shards(tmp, shards, tables, weights, parse_size(chunk_size))
        _copy_non_weights(folders[-1], tmp)
        record = {
            "kind": "weighted average", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "inputs": [{"path": str(f.resolve()), "weight": float(w)} for f, w in zip(folders, weights)],
            "weights_sum": float(sum(weights)), "allow_unnormalized": allow_unnormalized,
            "config_from": str(folders[-1].resolve()), "config_fields_taken_from_last": others,
            "tensors": len(keys), "shards": sorted(set(weight_map.values())),
        }
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return out


def _write_shards(folder: Path, shards: list[list[str]], tables: list[dict], weights,
                  chunk_bytes: int) -> dict[str, str]:
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        specs = [(k, tables[-1][k].dtype, tables[-1][k].shape) for k in shard]
        writer = ShardWriter(folder / file, specs)
        try:
            for key in shard:
                writer.write_chunks(key, _merged_pieces(key, [t[key] for t in tables], weights, chunk_bytes))
                total += tables[-1][key].nbytes
                weight_map[key] = file
        except BaseException:
            writer.close(complete=False)
            raise
        writer.close()
    if len(shards) > 1:
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2) + "\n")
    return weight_map


def _copy_non_weights(src: Path, dst: Path) -> None:
    """Config, tokenizer and processor files of the last model (not its weights)."""
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_FILES) and path.name not in (INDEX_FILE, RECORD_FILE):
            shutil.copy2(path, dst / path.name)


