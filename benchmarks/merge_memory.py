"""Peak memory of `bunny merge average` on two ~1 GB checkpoints.

Two synthetic float32 checkpoints (an embedding-sized 128 MB tensor plus 28 layer-sized
32 MB tensors each, ~1.03 GB per model, seeded) are averaged in a child process; its peak
resident memory (VmHWM, which counts file pages it maps too) must stay under half of
the two inputs' size. A child that only imports the merge code gives the fixed overhead
(Python + torch). The merged tensors are spot-checked against the weighted sum.

    .venv/bin/python benchmarks/merge_memory.py [--layers 28] [--workdir DIR]
"""
from __future__ import annotations

import os
import sys

# benchmarks/select.py would shadow the standard library's `select`: drop this folder from the path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from bunny.merge.safetensors_io import ShardWriter

# Each child reports its own peak from /proc/self/status (VmHWM: this process image's peak
# resident memory, file pages it maps included). ru_maxrss is not used: Linux carries the
# parent's peak across fork+exec into it.
PEAK = "; print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
CHILD_MERGE = ("import sys; from bunny.merge.average import average_models; "
               "average_models(sys.argv[1:3], [0.3, 0.7], sys.argv[3], max_shard_size='2GB')" + PEAK)
CHILD_IMPORT = "import torch; import bunny.merge.average" + PEAK


def write_checkpoint(folder: Path, seed: int, layers: int) -> int:
    """A checkpoint written tensor by tensor (the benchmark's own memory stays small)."""
    folder.mkdir(parents=True)
    specs = [("embed_tokens.weight", torch.float32, (32000, 1024))]
    specs += [(f"layers.{i}.mlp.weight", torch.float32, (2048, 4096)) for i in range(layers)]
    writer = ShardWriter(folder / "model.safetensors", specs)
    gen = torch.Generator().manual_seed(seed)
    for name, dtype, shape in specs:
        writer.write(name, torch.randn(shape, generator=gen, dtype=dtype))
    writer.close()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 1024}))
    return (folder / "model.safetensors").stat().st_size


def run_child(code: str, *args: str) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a child Python process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return int(proc.stdout.split()[-1]) / 1024, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bunny-merge-bench-", dir=args.workdir))
    try:
        sizes = [write_checkpoint(root / f"m{i}", seed=i, layers=args.layers) for i in (1, 2)]
        import_rss, _ = run_child(CHILD_IMPORT)
        merge_rss, seconds = run_child(CHILD_MERGE, str(root / "m1"), str(root / "m2"), str(root / "avg"))
        with safe_open(str(root / "m1" / "model.safetensors"), "pt") as a, \
                safe_open(str(root / "m2" / "model.safetensors"), "pt") as b, \
                safe_open(str(root / "avg" / "model.safetensors"), "pt") as c:
            for key in ("embed_tokens.weight", f"layers.{args.layers - 1}.mlp.weight"):
                torch.testing.assert_close(c.get_tensor(key), 0.3 * a.get_tensor(key) + 0.7 * b.get_tensor(key))
        inputs_mb = sum(sizes) / 2**20
        result = {
            "inputs_mb": round(inputs_mb), "per_model_mb": round(sizes[0] / 2**20),
            "largest_tensor_mb": 125, "import_only_peak_rss_mb": round(import_rss),
            "merge_peak_rss_mb": round(merge_rss), "limit_mb": round(inputs_mb / 2),
            "merge_seconds": round(seconds, 1), "under_limit": merge_rss < inputs_mb / 2,
            "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
        }
        print(json.dumps(result, indent=1))
        if not result["under_limit"]:
            raise SystemExit("peak memory is not under half of the inputs' size")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
