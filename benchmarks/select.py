"""Coreset selection benchmark (docs/benchmarks.md, "Coreset selection").

    python benchmarks/select.py [--work /tmp/bunny_bench] [--quick]

1. Speed: ours against two straightforward implementations on the same input and
   centroids (>= 200k rows, d=768, float16), all three required to select identical ids:
   - "dense+BFS": per cluster the full similarity matrix, then a breadth-first search;
   - "reference": the BFS of BAAI's LAION/dedup.py (peel one component at a time: the
     seed's similarity to every remaining row, frontier-vs-remaining products, copy the
     remaining rows each step), here in numpy on the CPU.
   Baselines load everything into memory and use plain sorts for steps 2-4; they share the
   rule functions (distance, scores, near-threshold refinement) so ids can be compared.
2. Scale: 250k / 500k / 1M rows, ~20k rows per cluster: wall time and peak RSS.
3. Ray (local, one worker per core) against the embedded engine (one worker per core) on the
   250k, 500k and 1M inputs: Ray's fixed start-up (~1.7 s here) weighs more on the smaller.
   Then the same runs joining a Ray started beforehand (`--address auto`): the engine's own
   overhead, without Ray's start.
Each measurement runs in a child process; peak memory is its VmHWM (resident, including the
touched pages of memory-mapped inputs) and its peak RssAnon (what it allocated), sampled.
"""
from __future__ import annotations

import os
import sys

# This file is named select.py: drop its folder from the path so the stdlib `select`
# (needed by subprocess) is not shadowed when it is run as a script.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import json
import resource
import subprocess
import time
from collections import deque
from pathlib import Path

import numpy as np

D, SHARD = 768, 50_000


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def generate(root: Path, n: int, per_cluster: int, seed: int = 0, spectrum: float = 0.0) -> Path:
    """LAION layout with CLIP-like structure: clusters around a shared mean direction
    (rows in a cluster have cosine ~0.5), 25% near-duplicates (cosine ~0.97 to their
    source, chains included), 8% bit-identical copies; captions at cosine ~0.3.

    `spectrum` shapes the in-cluster spread: 0 is isotropic (every direction the same
    variance: the worst case for exact pruning, since no projection certifies a pair);
    a > 0 gives direction i (of a random orthonormal basis) a variance proportional to
    i**-a, with the same total, like real embeddings whose variance sits in a minority of
    directions. The near-duplicate noise stays isotropic in both cases."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (root / "centroids.npy").exists():
        return root
    rng = np.random.default_rng(seed)
    k = max(1, n // per_cluster)
    centers = unit(unit(rng.normal(size=D))[None] + unit(rng.normal(size=(k, D)))).astype(np.float32)
    shape = None
    if spectrum:
        scale = np.arange(1, D + 1, dtype=np.float64) ** (-spectrum / 2)
        scale *= np.sqrt(D / np.sum(scale ** 2))  # same total variance as the isotropic case
        basis, _ = np.linalg.qr(rng.standard_normal((D, D)))
        shape = (scale[:, None] * basis.T).astype(np.float32)  # z @ shape: variance i**-a along basis i
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for s, a in enumerate(range(0, n, SHARD)):
        m = min(SHARD, n - a)
        z = rng.standard_normal((m, D), dtype=np.float32)
        x = centers[rng.integers(k, size=m)] + (z if shape is None else z @ shape) / np.sqrt(D)
        nd = m // 4
        src, dst = rng.integers(m, size=nd), rng.choice(m, nd, replace=False)
        x[dst] = x[src] + 0.25 * rng.standard_normal((nd, D), dtype=np.float32) / np.sqrt(D)
        x = unit(x).astype(np.float16)
        ne = m * 8 // 100
        x[rng.choice(m, ne, replace=False)] = x[rng.integers(m, size=ne)]
        t = unit(x.astype(np.float32) + 3.0 * rng.standard_normal((m, D), dtype=np.float32) / np.sqrt(D))
        np.save(root / f"img_emb/img_emb_{s:04d}.npy", x)
        np.save(root / f"text_emb/text_emb_{s:04d}.npy", t.astype(np.float16))
        pq.write_table(pa.table({"key": [f"{a + i:09d}" for i in range(m)]}), root / f"metadata/metadata_{s:04d}.parquet")
    np.save(root / "centroids.npy", centers)
    return root


# ---------------------------------------------------------------- baselines (in memory)
def _edges_ok(s, exact):
    """Edge decision shared with ours: BLAS value, refined near the threshold."""
    from bunny.select.rules import REFINE

    def decide(sim, thr, rows_a, rows_b):
        out = sim > thr + REFINE
        near = np.abs(sim - thr) <= REFINE
        if near.any():
            ia, ib = np.nonzero(near)
            out[ia, ib] = exact(rows_a[ia], rows_b[ib]) > thr
        return out
    return decide


def components_dense(xs, thr):
    """Full similarity matrix, then BFS over it."""
    from bunny.select.rules import pair_dots

    decide = _edges_ok(None, lambda i, j: pair_dots(xs, i, j))
    ids = np.arange(len(xs))
    adj = decide(xs @ xs.T, thr, ids, ids)
    labels = np.full(len(xs), -1)
    for s in range(len(xs)):
        if labels[s] >= 0:
            continue
        labels[s] = s
        q = deque([s])
        while q:
            u = q.popleft()
            nb = np.flatnonzero(adj[u] & (labels < 0))
            labels[nb] = s
            q.extend(nb.tolist())
    return labels


def components_reference(xs, thr):
    """BAAI LAION/dedup.py's batch BFS: peel components off the remaining rows."""
    from bunny.select.rules import pair_dots

    decide = _edges_ok(None, lambda i, j: pair_dots(xs, i, j))
    labels = np.full(len(xs), -1)
    embs, index_map = xs, np.arange(len(xs))
    while len(embs):
        seed_id = index_map[0]
        sim = decide((embs @ embs[0])[None, :], thr, index_map[:1], index_map)[0]
        sim[0] = True
        group = index_map[sim]
        pre = embs[sim][1:]
        embs, index_map = embs[~sim], index_map[~sim]
        pre_ids = group[1:]
        while len(pre) and len(embs):
            flag = decide(pre @ embs.T, thr, pre_ids, index_map).any(axis=0)
            if not flag.any():
                break
            group = np.r_[group, index_map[flag]]
            pre, pre_ids = embs[flag], index_map[flag]
            embs, index_map = embs[~flag], index_map[~flag]
        labels[group] = seed_id
    return labels


def naive_select(root: Path, method: str, n_draw=None, seed=0, thr=0.86):
    from bunny.select import rules
    from bunny.select.assign import Assigner

    imgs = sorted((root / "img_emb").glob("*.npy"))
    x = np.concatenate([np.load(p).astype(np.float32) for p in imgs])
    t = np.concatenate([np.load(str(p).replace("img_emb", "text_emb")).astype(np.float32) for p in imgs])
    c = np.load(root / "centroids.npy")
    cl = np.concatenate([Assigner(c)(x[a:a + 65536]) for a in range(0, len(x), 65536)])
    comp = components_dense if method == "dense" else components_reference
    surv = []
    for k in range(len(c)):
        idx = np.flatnonzero(cl == k)
        if not len(idx):
            continue
        labels = comp(x[idx], thr)
        keep = rules.keep_upper_median(labels, rules.centroid_distance(x[idx], c[k]), idx)
        surv.append(idx[keep])
    surv = np.sort(np.concatenate(surv))
    score = rules.row_dots(x[surv], t[surv])
    a, b = rules.window(len(surv), 0.4, 0.6)
    s2 = np.sort(surv[np.lexsort((surv, -score.astype(np.float64)))[a:b]])
    xs2, cl2 = x[s2], cl[s2]
    cos = np.concatenate([rules.centroid_cosine(xs2[cl2 == k], c[k]) for k in range(len(c))])
    s2c = np.concatenate([s2[cl2 == k] for k in range(len(c))])
    a, b = rules.window(len(s2c), 0.15, 0.35)
    s3 = np.sort(s2c[np.lexsort((s2c, -cos.astype(np.float64)))[a:b]])
    o = np.lexsort((s3, rules.draw_hash(s3, seed)))
    return np.sort(s3[o[: len(s3) if n_draw is None else n_draw]])


# ---------------------------------------------------------------- child runs
def child(spec: dict) -> dict:
    anon = AnonPeak()
    t0 = time.perf_counter()
    if spec["what"] == "ours":
        from bunny.select.engine import SelectConfig, select

        cfg = SelectConfig(input=spec["root"], out=spec["out"], centroids=str(Path(spec["root"]) / "centroids.npy"),
                           n=spec.get("n"), engine=spec.get("engine", "local"), workers=spec.get("workers", 0),
                           address=spec.get("address"), overwrite=True, progress=False)
        rep = select(cfg)
        wall = time.perf_counter() - t0  # the selection, imports included; not the reading back below
        import pyarrow.parquet as pq

        ids = pq.read_table(Path(spec["out"]) / "selected.parquet", columns=["gid"]).column("gid").to_numpy()
        extra = {"rows_after": rep["rows_after"], "stages": cfg.timings, "workers": rep["workers"]}
    else:
        ids = naive_select(Path(spec["root"]), spec["what"], spec.get("n"))
        wall = time.perf_counter() - t0
        extra = {}
    np.save(spec["ids"], ids)
    anon_gb = anon.stop()
    # with step 1's worker processes: their summed resident memory, sampled, when larger
    return {"wall_s": wall, "peak_rss_gb": max(peak_rss_gb(), anon.rss_peak / 2**20), "peak_anon_gb": anon_gb,
            **extra}


class AnonPeak:
    """Peak anonymous memory (RssAnon) of this process and its children (step 1's forked
    workers), summed, sampled every 20 ms (pages a child shares copy-on-write with this
    process count twice: an upper bound); and the peak of this process's resident memory
    (VmRSS) plus its children's anonymous memory: their file pages are the input shards'
    pages, which this process maps too. VmHWM also counts the pages of memory-mapped input
    shards the run has touched, which grow with the input and which the kernel drops under
    pressure; RssAnon is what the run allocated."""

    def __init__(self):
        import threading

        self.peak, self.rss_peak, self._stop = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def _field(pid, name: str) -> int:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith(name):
                    return int(line.split()[1])
        except OSError:  # the process just ended
            pass
        return 0

    @staticmethod
    def _tree(pid="self") -> list:
        out = [pid]
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                for child in open(f"/proc/{pid}/task/{tid}/children").read().split():
                    out += AnonPeak._tree(child)
        except OSError:
            pass
        return out

    def _read(self) -> tuple[int, int]:
        """(summed RssAnon, VmRSS + the children's RssAnon) in kB."""
        pids = self._tree()
        children = sum(self._field(p, "RssAnon:") for p in pids[1:])
        return self._field("self", "RssAnon:") + children, self._field("self", "VmRSS:") + children

    def _poll(self):
        while not self._stop.is_set():
            anon, rss = self._read()
            self.peak, self.rss_peak = max(self.peak, anon), max(self.rss_peak, rss)
            self._stop.wait(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._read()[0]) / 2**20


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: after fork + exec it
    starts from the parent's peak, which here includes the generated inputs."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(spec: dict, cap: float | None = None) -> dict:
    load0 = os.getloadavg()[0]
    res = _measure(spec, cap)
    res["load_avg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # before, after
    return res


def _measure(spec: dict, cap: float | None = None) -> dict:
    try:
        r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                           timeout=cap)
    except subprocess.TimeoutExpired:
        print(f"  {spec['what']:<9} stopped after {cap} s", flush=True)
        return {"wall_s": float(cap), "stopped": True, "peak_rss_gb": None}
    if r.returncode:
        raise SystemExit(f"child failed: {spec}\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {spec['what']:<9} {spec.get('engine', ''):<5} {Path(spec['root']).name:<12} "
          f"{res['wall_s']:8.1f} s  peak {res['peak_rss_gb']:.2f} GB (anonymous {res.get('peak_anon_gb') or 0:.2f} GB)", flush=True)
    return res


def _tag(spectrum: float) -> str:
    return f"_spec{spectrum:g}" if spectrum else ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None, help="folder for inputs and outputs (default /tmp/bunny_bench)")
    ap.add_argument("--child")
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    ap.add_argument("--speed-rows", type=int, default=200_000)
    ap.add_argument("--speed-cluster", type=int, default=2_000)
    ap.add_argument("--cap", type=int, default=600, help="seconds before a baseline run is stopped")
    ap.add_argument("--repeat", type=int, default=3, help="runs of ours in the speed part (the median is compared)")
    ap.add_argument("--baseline-repeat", type=int, default=1,
                    help="runs of each baseline in the speed part (the median is compared; each ~80 s on 2 cores)")
    ap.add_argument("--settle", type=float, default=20.0,
                    help="seconds to wait before a speed run that follows a baseline run (memory settles)")
    ap.add_argument("--threads", type=int, default=0,
                    help="BLAS threads of every measured run (OPENBLAS/OMP/MKL_NUM_THREADS; 0: library default)")
    ap.add_argument("--only-speed", action="store_true", help="skip the scale and Ray parts")
    ap.add_argument("--only-scale", action="store_true", help="skip the speed comparison")
    ap.add_argument("--baselines", default="dense,reference", help="comma-separated: dense, reference")
    ap.add_argument("--spectrum", type=float, default=0.0,
                    help="in-cluster variance along direction i proportional to i**-SPECTRUM (0: isotropic)")
    g = ap.add_argument_group("GPU mode (--gpu): see benchmarks/select_gpu.py")
    g.add_argument("--gpu", action="store_true", help="generate --rows on the GPU and select with --device cuda")
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
    args = ap.parse_args()
    if args.threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.gpu:
        import importlib.util

        spec = importlib.util.spec_from_file_location("select_gpu", Path(__file__).with_name("select_gpu.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.main(args)
        return
    w = Path(args.work or "/tmp/bunny_bench")
    scale = [20_000, 40_000] if args.quick else [250_000, 500_000, 1_000_000]
    per = 5_000 if args.quick else 20_000
    speed_rows = 20_000 if args.quick else args.speed_rows
    print("generating inputs", flush=True)
    speed_root = None if args.only_scale else generate(
        w / f"speed_{speed_rows}_{args.speed_cluster}{_tag(args.spectrum)}", speed_rows, args.speed_cluster, seed=1,
        spectrum=args.spectrum)
    roots = {} if args.only_speed else {n: generate(w / f"scale_{n}{_tag(args.spectrum)}", n, per, seed=2,
                                                     spectrum=args.spectrum) for n in scale}
    baselines = [b for b in args.baselines.split(",") if b]

    res = {"machine": machine(), "speed": {}, "scale": {}, "ray": {}, "threads": args.threads or None,
           "spectrum": args.spectrum}
    if not args.only_scale:
        print(f"speed: {speed_rows} rows, {args.speed_cluster} rows per cluster", flush=True)
        res["speed"] = speed(w, speed_root, baselines, args.repeat, args.cap, args.baseline_repeat, args.settle)
    if args.only_speed:
        (w / "results_speed.json").write_text(json.dumps(res, indent=1, default=str))
        print(json.dumps(res, indent=1, default=str))
        return
    print("scale", flush=True)
    for n, root in roots.items():
        res["scale"][n] = measure({"what": "ours", "root": str(root), "out": str(w / "out_scale"),
                                   "ids": str(w / f"ids_scale_{n}.npy")})
    print("ray vs embedded (every scale input)", flush=True)
    for n in scale:
        ray = measure({"what": "ours", "engine": "ray", "root": str(roots[n]), "out": str(w / "out_ray"),
                       "ids": str(w / f"ids_ray_{n}.npy")})
        res["ray"][n] = {"embedded": res["scale"][n], "ray": ray,
                         "identical_ids": bool(np.array_equal(np.load(w / f"ids_scale_{n}.npy"),
                                                              np.load(w / f"ids_ray_{n}.npy"))),
                         "ratio": ray["wall_s"] / res["scale"][n]["wall_s"]}
    print("ray joining a running local Ray (--address auto): the engine without Ray's own start", flush=True)
    with local_ray_cluster():
        for n in scale:
            ray = measure({"what": "ours", "engine": "ray", "address": "auto", "root": str(roots[n]),
                           "out": str(w / "out_ray"), "ids": str(w / f"ids_rayj_{n}.npy")})
            res["ray"][n]["joined"] = {"ray": ray, "ratio": ray["wall_s"] / res["scale"][n]["wall_s"],
                                       "identical_ids": bool(np.array_equal(np.load(w / f"ids_scale_{n}.npy"),
                                                                            np.load(w / f"ids_rayj_{n}.npy")))}
    (w / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))


class local_ray_cluster:
    """`ray start --head` with one CPU per core (as the engine's own local Ray), stopped on exit."""

    def __enter__(self):
        ray = str(Path(sys.executable).with_name("ray"))
        self.stop = [ray, "stop", "--force"]
        subprocess.run([ray, "start", "--head", f"--num-cpus={len(os.sched_getaffinity(0))}",
                        "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True)
        return self

    def __exit__(self, *exc):
        subprocess.run(self.stop, capture_output=True)


def speed(w: Path, root: Path, baselines: list[str], repeat: int, cap: float, baseline_repeat: int = 1,
          settle: float = 20.0) -> dict:
    """Ours `repeat` times and each baseline `baseline_repeat` times, interleaved (ours,
    each baseline, ours, ...: a slow spell of a shared machine weighs on both sides);
    medians compared (a 2-core machine's timings vary by ~10% run to run, the dense
    baseline's by up to 20%); identical selected ids required. A run after a baseline
    waits `settle` seconds first: right after the dense baseline freed its ~6 GB, ours ran
    3.9-4.4 s, 20 s later 3.2-3.5 s (this VM: freed memory is slow to touch again for a while)."""
    ours, runs = [], {what: [] for what in baselines}
    spec = {"what": "ours", "root": str(root), "out": str(w / "out_speed"), "ids": str(w / "ids_ours.npy"), "n": None}
    for i in range(max(1, repeat, baseline_repeat)):
        if i < max(1, repeat):
            if i and baselines:
                time.sleep(settle)
            ours.append(measure(spec))
        for what in baselines:
            done = runs[what]
            if i >= max(1, baseline_repeat) or (done and done[-1].get("stopped")):
                continue
            if done or i:
                time.sleep(settle)
            done.append(measure({"what": what, "root": str(root), "out": str(w / "out_speed"),
                                 "ids": str(w / f"ids_{what}.npy"), "n": None}, cap=cap))
            if not done[-1].get("stopped"):
                done[-1]["identical_ids"] = bool(np.array_equal(np.load(w / "ids_ours.npy"),
                                                                np.load(w / f"ids_{what}.npy")))
    res = {"ours": _median_of(ours)}
    for what in baselines:
        res[what] = _median_of(runs[what])
        res[what]["speedup"] = res[what]["wall_s"] / res["ours"]["wall_s"]  # a lower bound if stopped
        if not res[what].get("stopped"):
            res[what]["identical_ids"] = all(r["identical_ids"] for r in runs[what])
    return res


def _median_of(runs: list[dict]) -> dict:
    """The median run's record, with the median wall time and every run's time."""
    walls = [r["wall_s"] for r in runs]
    return {**sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2], "wall_s": float(np.median(walls)),
            "runs_s": walls}


def machine() -> dict:
    """What the figures were measured on: CPU model, cores, SIMD level."""
    info = {"cores": len(os.sched_getaffinity(0)), "cpu": None, "simd": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and info["cpu"] is None:
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags") and info["simd"] is None:
            flags = set(line.split(":", 1)[1].split())
            info["simd"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
    return info


if __name__ == "__main__":
    main()
