"""`bunny data report OUT`: the selection's figures as a markdown table and PNG plots
(cluster sizes, component sizes, the two score distributions with their windows), read
from report.json and cluster_sizes.npy; nothing is recomputed from the embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bunny.errors import BunnyError


def table(rep: dict, sizes: np.ndarray) -> str:
    rows = rep["rows_after"]
    lines = ["| step | rows | kept of previous |", "|---|---:|---:|"]
    prev = None
    for name, n in rows.items():
        frac = "" if prev in (None, 0) else f"{n / prev:.1%}"
        lines.append(f"| {name} | {n:,} | {frac} |")
        prev = n
    nz = sizes[sizes > 0]
    comp = {int(k): v for k, v in rep.get("component_sizes", {}).items()}
    lines += ["", f"clusters: {len(sizes)} ({len(nz)} non-empty), rows per cluster: "
              f"min {nz.min() if len(nz) else 0}, median {int(np.median(nz)) if len(nz) else 0}, "
              f"max {nz.max() if len(nz) else 0}"]
    if comp:
        multi = sum(v for k, v in comp.items() if k > 1)
        lines.append(f"components: {sum(comp.values()):,} ({multi:,} with more than one row, largest {max(comp)})")
    edges = rep.get("window_edges", {})
    for name in ("clip", "centroid"):
        if name in edges:
            lo, hi = edges[name]
            below = f"down to just above {hi}" if hi is not None else "down to the lowest"
            lines.append(f"{name} window: kept scores from {lo} {below} (ties at an edge split by gid)")
    return "\n".join(lines)


def report(out: str | Path) -> str:
    """Write OUT/report/{report.md, cluster_sizes.png, component_sizes.png, clip_scores.png,
    centroid_cos.png}; return the markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if not (out / "report.json").exists():
        raise BunnyError(f"{out}: no report.json (is this the output folder of `bunny data select`?)")
    rep = json.loads((out / "report.json").read_text())
    sizes = np.load(out / "cluster_sizes.npy")
    dest = out / "report"
    dest.mkdir(exist_ok=True)
    text = table(rep, sizes)
    (dest / "report.md").write_text(text + "\n")
    bins = np.array(rep["hist_bins"])
    centers = (bins[:-1] + bins[1:]) / 2
    plots = ["cluster_sizes", "component_sizes", "clip_scores", "centroid_cos"]
    for name in tqdm(plots, desc="plots"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if name == "cluster_sizes":
            ax.hist(sizes, bins=min(50, max(1, len(sizes))))
            ax.set(xlabel="rows per cluster", ylabel="clusters")
        elif name == "component_sizes":
            comp = {int(k): v for k, v in rep.get("component_sizes", {}).items()}
            if comp:
                ax.bar(list(comp), list(comp.values()))
                ax.set_yscale("log")
            ax.set(xlabel="rows per step-1 component", ylabel="components")
        else:
            key, edge, title = (("hist_clip", "clip", "image-text score (step-1 survivors)") if name == "clip_scores"
                                else ("hist_centroid_cos", "centroid", "centroid cosine (step-2 survivors)"))
            hist = np.array(rep[key])
            nz = np.flatnonzero(hist)
            ax.bar(centers, hist, width=bins[1] - bins[0])
            if len(nz):
                ax.set_xlim(bins[max(nz[0] - 2, 0)], bins[min(nz[-1] + 3, len(bins) - 1)])
            for v in rep["window_edges"][edge]:
                if v is not None:
                    ax.axvline(v, color="red", linestyle="--")
            ax.set(xlabel=title, ylabel="rows")
        fig.tight_layout()
        fig.savefig(dest / f"{name}.png", dpi=100)
        plt.close(fig)
    return text
