"""`bunny data synth`: the synthetic demo dataset; `bunny data shard`: LLaVA data as parquet
or webdataset shards. Thin faces over `bunny.data.synthetic_io.synthesize` and
`bunny.data.shards.write_shards`."""
from __future__ import annotations

import json

from bunny.cli import get_group


def add_parsers(sub, groups) -> None:
    data = get_group(sub, groups, "data", help="Datasets: synthesis, mixtures, selection.")
    p = data.add_parser("synth", help="Generate the synthetic shapes dataset (images, "
                        "stage-1/2 LLaVA JSON, held-out eval JSONL).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, required=True, help="number of training images")
    p.add_argument("--eval", type=int, required=True, help="number of held-out images (even)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-turns", type=int, default=None,
                   help="cap QA turns per stage-2 sample (the yes/no pair comes first)")
    p.add_argument("--no-suffix", action="store_true",
                   help="do not append the short-answer instruction to questions")
    p.set_defaults(func=_synth)

    s = data.add_parser("shard", help="Write LLaVA data (JSON/JSONL or shards) as parquet or webdataset "
                        "shards with the image bytes embedded.")
    s.add_argument("--input", required=True, help="LLaVA .json/.jsonl (or any data_path the trainer reads)")
    s.add_argument("--out", required=True, help="output folder (must hold no shards of this format)")
    s.add_argument("--format", required=True, choices=["parquet", "webdataset"])
    s.add_argument("--samples-per-shard", type=int, required=True)
    s.add_argument("--image-root", default=None, help="folder image paths are relative to "
                   "(default: the input file's folder)")
    s.add_argument("--prefix", default="shard", help="shard names: PREFIX-00000.parquet, ... (default shard)")
    s.add_argument("--rows-per-group", type=int, default=64,
                   help="parquet row-group size; a random access reads one group's images (default 64)")
    s.add_argument("--skip-missing", action="store_true", help="drop samples whose image is missing")
    s.set_defaults(func=_shard)


def _synth(args) -> int:
    from bunny.data.synthetic_io import SHORT_ANSWER_SUFFIX, synthesize

    meta = synthesize(args.out, args.train, args.eval, args.seed, max_turns=args.max_turns,
                      suffix="" if args.no_suffix else SHORT_ANSWER_SUFFIX)
    print(json.dumps(meta, indent=1))
    return 0


def _shard(args) -> int:
    from bunny.data.shards import write_shards

    meta = write_shards(args.input, args.out, args.format, args.samples_per_shard, args.image_root,
                        prefix=args.prefix, skip_missing=args.skip_missing, rows_per_group=args.rows_per_group)
    print(json.dumps(meta, indent=1))
    return 0
