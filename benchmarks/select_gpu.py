"""GPU benchmark of the coreset selection (`python -m benchmarks.select --gpu`, or this file).

    PYTHONPATH=src python -m benchmarks.select --gpu --rows 10000000 --work DIR --json OUT.json

1. Generates `--rows` rows (d = 768, float16) in the LAION layout with torch on the device
   (the same recipe as benchmarks/select.py's `generate`: clusters around a shared mean
   direction, 25% near-duplicates, 8% bit-identical copies, captions at cosine ~0.3),
   `--per-cluster` rows per cluster, shards written by a thread pool. Timed on its own.
2. Runs `select(device=cuda)` end to end (value check, assignment, step 1, windows, parquet
   outputs) with `--workers` threads: rows/s for assignment, for step 1 (gather + similarity
   kernel + scores) and end to end.
3. The per-cluster kernel alone on the largest clusters: torch on the GPU against the numpy
   kernel on the CPU (all cores) and the dense-matrix + BFS baseline on one cluster; labels
   must be identical.
0. (first) Identical ids: a small separate input (`--check-rows`) selected with --device
   cuda and with the CPU path (numpy; faiss's numpy stand-in where faiss is missing); every
   output file must be equal.
Everything runs against a wall-clock budget (`--budget`, seconds, generation included): when
the full size cannot fit (disk, memory or time), fewer rows are generated and the JSON and
the printout say so. Step 3 is skipped when the budget is spent.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

D = 768


def peak_rss_gb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def pick_work(arg: str | None, need_bytes: int) -> Path:
    if arg:
        return Path(arg)
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.15 * need_bytes:
        return shm / "bunny_select_gpu"
    return Path("/tmp/bunny_select_gpu")


def _unit(t):
    return t / t.norm(dim=-1, keepdim=True)


def _write_shard(root: Path, s: int, a: int, x: np.ndarray, t: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    np.save(root / f"img_emb/img_emb_{s:04d}.npy", x)
    np.save(root / f"text_emb/text_emb_{s:04d}.npy", t)
    keys = pc.utf8_lpad(pc.cast(pa.array(np.arange(a, a + len(x), dtype=np.int64)), pa.string()), 9, "0")
    pq.write_table(pa.table({"key": keys}), root / f"metadata/metadata_{s:04d}.parquet")


def generate_torch(root: Path, n: int, per_cluster: int, shard_rows: int, device: str, seed: int = 0,
                   deadline: float = float("inf"), writers: int = 8) -> dict:
    """LAION layout generated on `device`. Stops starting new shards after `deadline`
    (time.perf_counter()); returns rows written, shards, clusters, seconds."""
    import torch

    t0 = time.perf_counter()
    dev = torch.device("cpu" if device == "torch-cpu" else device)
    g = torch.Generator(device=dev).manual_seed(seed)
    k = max(1, n // per_cluster)
    mean = _unit(torch.randn(D, generator=g, device=dev))
    centers = _unit(mean[None] + _unit(torch.randn(k, D, generator=g, device=dev)))
    if root.exists():
        shutil.rmtree(root)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True)
    np.save(root / "centroids.npy", centers.cpu().numpy().astype(np.float32))
    pool = ThreadPoolExecutor(writers)
    pending = threading.BoundedSemaphore(2 * writers)  # host memory: at most this many shards queued
    futures, rows, s = [], 0, 0
    rs = 1.0 / np.sqrt(D)
    for s, a in enumerate(range(0, n, shard_rows)):
        if time.perf_counter() > deadline:
            break
        m = min(shard_rows, n - a)
        x = centers[torch.randint(k, (m,), generator=g, device=dev)]
        x += torch.randn(m, D, generator=g, device=dev) * rs
        nd = m // 4
        src = torch.randint(m, (nd,), generator=g, device=dev)
        dst = torch.randperm(m, generator=g, device=dev)[:nd]
        x[dst] = x[src] + 0.25 * rs * torch.randn(nd, D, generator=g, device=dev)
        x = _unit(x).half()
        ne = m * 8 // 100
        x[torch.randperm(m, generator=g, device=dev)[:ne]] = x[torch.randint(m, (ne,), generator=g, device=dev)]
        t = _unit(x.float() + 3.0 * rs * torch.randn(m, D, generator=g, device=dev)).half()
        xi, ti = x.cpu().numpy(), t.cpu().numpy()
        pending.acquire()
        fut = pool.submit(_write_shard, root, s, a, xi, ti)
        fut.add_done_callback(lambda _f: pending.release())
        futures.append(fut)
        rows += m
    for f in futures:
        f.result()
    pool.shutdown()
    return {"rows": rows, "shards": len(futures), "clusters": k, "rows_per_cluster": rows / k,
            "seconds": time.perf_counter() - t0}


def kernel_compare(out: Path, root: Path, device: str, clusters: int = 2, deadline: float = float("inf")) -> dict:
    """Step 1's kernel alone on the largest clusters: torch on `device` vs numpy on the CPU
    (and the dense + BFS baseline on the first one); labels must be identical."""
    import torch

    from bunny.select import rules
    from bunny.select.gpu import torch_edges
    from bunny.select.kernel import cluster_rows
    from bunny.select.layout import open_layout

    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_select", Path(__file__).with_name("select.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    layout = open_layout(root)
    sizes = np.load(out / "cluster_sizes.npy")
    res = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for c in np.argsort(-sizes, kind="stable")[:clusters]:
        if time.perf_counter() > deadline:
            break
        parts = list(cluster_rows(layout, out / "_work", int(c)))
        x = np.concatenate([layout.rows_f32(layout.img(s.index), r) for s, r in parts])
        row = {"cluster": int(c), "rows": len(x)}
        edges = torch_edges(device)
        rules.components(x[:64], 0.86, edges=edges)  # warm-up (CUDA context, kernels)
        sync()
        t = time.perf_counter()
        lab_gpu = rules.components(x, 0.86, edges=edges)
        sync()
        row["torch_s"] = time.perf_counter() - t
        t = time.perf_counter()
        lab_cpu = rules.components(x, 0.86)
        row["numpy_cpu_s"] = time.perf_counter() - t
        row["identical_labels"] = bool(np.array_equal(lab_gpu, lab_cpu))
        if not res and time.perf_counter() < deadline:  # the baseline, on one cluster
            t = time.perf_counter()
            lab_dense = bench.components_dense(x, 0.86)
            row["dense_bfs_cpu_s"] = time.perf_counter() - t
            # BFS labels by its seed; compare the partitions
            row["dense_bfs_same_partition"] = bool(np.array_equal(_canon(lab_dense), _canon(lab_gpu)))
        for k in ("torch_s", "numpy_cpu_s", "dense_bfs_cpu_s"):
            if k in row:
                row[k.replace("_s", "_rows_per_s")] = row["rows"] / max(row[k], 1e-9)
        res.append(row)
        print(f"  kernel, cluster {c} ({len(x)} rows): torch {row['torch_s']:.2f} s, numpy CPU "
              f"{row['numpy_cpu_s']:.2f} s" + (f", dense+BFS CPU {row['dense_bfs_cpu_s']:.2f} s"
                                               if "dense_bfs_cpu_s" in row else "")
              + f", identical: {row['identical_labels']}", flush=True)
    return {"clusters": res}


def _canon(labels: np.ndarray) -> np.ndarray:
    """Labels renamed by first occurrence (the partition, whatever each method calls it)."""
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv.ravel()]


def select_run(root: Path, out: Path, device: str, workers: int) -> dict:
    from bunny.select.engine import SelectConfig, select

    cfg = SelectConfig(input=str(root), out=str(out), centroids=str(root / "centroids.npy"), device=device,
                       workers=workers, overwrite=True, progress=False)
    t = time.perf_counter()
    rep = select(cfg)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "stages_s": {k: round(v, 3) for k, v in cfg.timings.items()},
            "rows_after": rep["rows_after"]}


def same_outputs(a: Path, b: Path) -> bool:
    import pyarrow.parquet as pq

    files = ["selected.parquet", "stages/dedup.parquet", "stages/clip.parquet", "stages/centroid.parquet"]
    return all(pq.read_table(a / f).equals(pq.read_table(b / f)) for f in files)


def main(args) -> dict:
    import torch

    t_start = time.perf_counter()
    budget = float(args.budget)
    deadline = t_start + budget
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device (use --device torch-cpu to try the script on a CPU)")
    workers = args.workers or os.cpu_count() or 1
    n_want = args.rows
    bytes_per_row = 2 * D * 2 + 16  # image + text float16, plus metadata
    work = pick_work(args.work, n_want * bytes_per_row)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    notes = []
    n = n_want
    if n * bytes_per_row * 1.15 > free:
        n = int(free / 1.15 / bytes_per_row) // args.shard_rows * args.shard_rows
        notes.append(f"scaled down from {n_want} to {n} rows: {free / 2**30:.0f} GiB free in {work}")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    env = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "numpy": np.__version__, "cpus": os.cpu_count(), "workers": workers,
           "ram_gib": round(mem / 2**30, 1), "work": str(work), "free_gib": round(free / 2**30, 1)}
    try:
        import faiss  # noqa: F401
        env["faiss"] = True
    except ImportError:
        env["faiss"] = False
    print("environment:", json.dumps(env), flush=True)
    res = {"environment": env, "requested_rows": n_want, "notes": notes}

    def save():  # after every stage: a run stopped early still leaves its figures
        if args.json:
            res["elapsed_s"] = time.perf_counter() - t_start
            Path(args.json).write_text(json.dumps(res, indent=1, default=float))

    # 0. identical ids on a small input, device against the CPU path (first: cheap, and it
    # exercises every stage on the device before the large run)
    if args.check_rows:
        croot = work / "check_input"
        cgen = generate_torch(croot, args.check_rows, min(args.per_cluster, max(1, args.check_rows // 10)),
                              min(args.shard_rows, 50_000), device, seed=args.seed + 1)
        on_dev = select_run(croot, work / "check_dev", device, workers)
        on_cpu = select_run(croot, work / "check_cpu", "cpu", workers)
        res["check"] = {"rows": cgen["rows"], "clusters": cgen["clusters"], "device": on_dev, "cpu": on_cpu,
                        "identical_outputs": same_outputs(work / "check_dev", work / "check_cpu"),
                        "cpu_over_device_time": on_cpu["wall_s"] / on_dev["wall_s"]}
        print(f"check input {cgen['rows']} rows: {device} {on_dev['wall_s']:.1f} s, cpu {on_cpu['wall_s']:.1f} s, "
              f"identical outputs: {res['check']['identical_outputs']}", flush=True)
        for d in ("check_input", "check_dev", "check_cpu"):
            shutil.rmtree(work / d, ignore_errors=True)
        save()

    # 1. data generation: at most gen_frac of the budget
    print(f"generating {n} rows ({n // args.per_cluster} clusters) in {work}", flush=True)
    gen = generate_torch(work / "input", n, args.per_cluster, args.shard_rows, device, seed=args.seed,
                         deadline=time.perf_counter() + args.gen_frac * budget)
    res["generation"] = gen
    if gen["rows"] < n:
        notes.append(f"scaled down from {n_want} to {gen['rows']} rows: generation reached "
                     f"{args.gen_frac:.0%} of the {budget:.0f} s budget")
    print(f"  generated {gen['rows']} rows in {gen['seconds']:.1f} s "
          f"({gen['rows'] / gen['seconds']:,.0f} rows/s)", flush=True)
    save()

    # 2. the selection end to end on the device
    print(f"select --device {device} --workers {workers}", flush=True)
    run = select_run(work / "input", work / "out", device, workers)
    rows = gen["rows"]
    st = run["stages_s"]
    run["rows_per_s"] = {"end_to_end": rows / run["wall_s"], "assign": rows / max(st["assign"], 1e-9),
                         "step1_dedup": rows / max(st["dedup"], 1e-9), "value_check": rows / max(st["check"], 1e-9)}
    run["peak_rss_gb"] = peak_rss_gb()
    if device.startswith("cuda"):
        run["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    res["select"] = run
    print(f"  {rows} rows in {run['wall_s']:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in st.items()), flush=True)
    print("  rows/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in run["rows_per_s"].items()), flush=True)
    save()

    # 3. the kernel alone, GPU against CPU
    if time.perf_counter() < deadline - 20:
        res["kernel"] = kernel_compare(work / "out", work / "input", device, clusters=args.kernel_clusters,
                                       deadline=deadline - 15)
    else:
        notes.append("kernel comparison skipped: budget spent")

    res["total_s"] = time.perf_counter() - t_start
    res["within_budget"] = res["total_s"] <= budget
    for note in notes:
        print("NOTE:", note, flush=True)
    print(f"total {res['total_s']:.1f} s (budget {budget:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float))
    if not args.keep:
        shutil.rmtree(work / "input", ignore_errors=True)
    return res


def parse(argv=None):
    import argparse

    g = argparse.ArgumentParser(description="GPU benchmark of the coreset selection")
    g.add_argument("--rows", type=int, default=10_000_000)
    g.add_argument("--per-cluster", type=int, default=20_000)
    g.add_argument("--shard-rows", type=int, default=250_000)
    g.add_argument("--budget", type=float, default=200.0, help="seconds for the whole GPU run, generation included")
    g.add_argument("--gen-frac", type=float, default=0.3, help="share of the budget generation may take")
    g.add_argument("--device", default="cuda")
    g.add_argument("--workers", type=int, default=0, help="threads (default: all cores)")
    g.add_argument("--check-rows", type=int, default=200_000, help="input for the identical-ids check (0: skip)")
    g.add_argument("--kernel-clusters", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", help="write the results here")
    g.add_argument("--keep", action="store_true", help="keep the generated input")
    g.add_argument("--work", default=None, help="folder for the generated input and outputs")
    return g.parse_args(argv)


if __name__ == "__main__":
    main(parse())
