"""`bunny data select | embed | report`: parse arguments, call one public function each."""
from __future__ import annotations

from bunny.cli import get_group


def add_parsers(sub, groups) -> None:
    data = get_group(sub, groups, "data", help="Data: coreset selection, embedding, mixtures.")

    p = data.add_parser("select", help="Coreset selection from LAION-layout CLIP embeddings.")
    p.add_argument("--input", required=True,
                   help="folder with img_emb/, text_emb/, metadata/: a path or an fsspec URL (s3://..., gs://...)")
    p.add_argument("--out", required=True, help="output folder (must be empty, see --overwrite/--resume)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--centroids", help="(k, d) .npy of centroids to assign to")
    g.add_argument("--k", type=int, help="fit k centroids with faiss k-means instead")
    p.add_argument("--seed", type=int, default=0, help="k-means sample/fit and final draw")
    p.add_argument("--threshold", type=float, default=0.86, help="step 1: join rows with dot > this")
    p.add_argument("--clip-window", type=float, nargs=2, default=(0.40, 0.60), metavar=("LO", "HI"))
    p.add_argument("--centroid-window", type=float, nargs=2, default=(0.15, 0.35), metavar=("LO", "HI"))
    p.add_argument("--n", type=int, help="rows to draw at the end (default: all step-3 survivors)")
    p.add_argument("--mode", choices=["bunny", "semdedup"], default="bunny")
    p.add_argument("--eps", type=float, default=0.14, help="semdedup: drop at cosine > 1 - eps")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--workers", type=int, default=0,
                   help="shards/clusters processed at once (threads or Ray tasks); default: one per core")
    p.add_argument("--device", default="cpu",
                   help="cpu (numpy + faiss, default), cuda or cuda:N (assignment and similarity with torch "
                        "on a GPU; same ids), torch-cpu (the torch code on the CPU)")
    p.add_argument("--products", choices=["int8", "float32"], default="int8",
                   help="step 1 on the CPU: products of the pruning bound (int8, default, or float32); same ids")
    p.add_argument("--address", help="ray: address of a running cluster to join (HOST:PORT or auto; default: "
                                      "start a local one); the cluster keeps running after the run")
    p.add_argument("--no-fork", action="store_true",
                   help="local engine: step 1 in threads instead of forked worker processes (for a caller whose "
                        "other threads must not be forked)")
    p.add_argument("--renormalize", action="store_true", help="L2-normalise rows as they are read")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--kmeans-sample", type=int, default=0, help="rows for k-means (default 256 per centroid)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_select)

    e = data.add_parser("embed", help="Compute the LAION embedding layout for image-text pairs.")
    e.add_argument("--input", required=True, help="webdataset .tar (or folder of them), .parquet, or image folder")
    e.add_argument("--captions", help="for an image folder: .jsonl {file, caption[, key]} or .tsv file<TAB>caption")
    e.add_argument("--out", required=True)
    e.add_argument("--model", default="openai/clip-vit-large-patch14", help="transformers CLIP name or path")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--shard-size", type=int, default=10000, help="rows per output shard")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored dtype")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_embed)

    r = data.add_parser("report", help="Tables and plots of a selection output folder.")
    r.add_argument("out", help="output folder of `bunny data select`")
    r.set_defaults(func=_report)


def _select(args) -> int:
    from bunny.select.engine import SelectConfig, select

    rep = select(SelectConfig(
        input=args.input, out=args.out, centroids=args.centroids, k=args.k, seed=args.seed,
        threshold=args.threshold, clip_window=tuple(args.clip_window), centroid_window=tuple(args.centroid_window),
        n=args.n, mode=args.mode, eps=args.eps, engine=args.engine, device=args.device, products=args.products,
        workers=args.workers, address=args.address, fork=not args.no_fork,
        renormalize=args.renormalize, overwrite=args.overwrite, resume=args.resume,
        kmeans_sample=args.kmeans_sample, progress=not args.no_progress))
    print(" -> ".join(f"{k} {v}" for k, v in rep["rows_after"].items()))
    return 0


def _embed(args) -> int:
    from bunny.select.embed import embed

    n = embed(args.input, args.out, model=args.model, captions=args.captions, batch_size=args.batch_size,
              shard_size=args.shard_size, device=args.device, dtype=args.dtype, progress=not args.no_progress)
    print(f"{n} rows embedded into {args.out}")
    return 0


def _report(args) -> int:
    from bunny.select.report import report

    print(report(args.out))
    return 0
