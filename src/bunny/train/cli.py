"""`bunny train pretrain|finetune CONFIG.yaml [--set k=v | --k v ...]`, `bunny data mix
RECIPE.yaml` and `bunny demo`. A thin face over `bunny.train.trainer.train`,
`bunny.data.mix.build_mixture` and `bunny.train.demo.run_demo`."""
from __future__ import annotations

import argparse
import json

from bunny.cli import get_group


def add_parsers(sub, groups) -> None:
    train = get_group(sub, groups, "train", help="Training: pre-training, fine-tuning.")
    for stage, text in (("pretrain", "Stage 1: train the projector on captions (template plain, square images)."),
                        ("finetune", "Stage 2: LoRA (or full) on the LLM + projector (+ tower), model template.")):
        p = train.add_parser(stage, help=text,
                             description=text + " Any recipe field can be overridden: --set lr=1e-3 or --lr 1e-3.")
        p.add_argument("config", help="recipe YAML (see configs/)")
        p.add_argument("overrides", nargs=argparse.REMAINDER, help="--set key=value or --key value, repeatable")
        p.set_defaults(func=_train, stage=stage)
    try:  # the tower pre-training command lives beside this one (bunny train tower)
        from bunny.train import tower_cli
    except ImportError:
        tower_cli = None
    if tower_cli is not None and "tower" not in train.choices:  # bunny.cli may list it itself one day
        tower_cli.add_parsers(sub, groups)

    data = get_group(sub, groups, "data", help="Datasets: synthesis, mixtures, selection.")
    p = data.add_parser("mix", help="Build a fine-tuning mixture from sources with per-source rules.")
    p.add_argument("recipe", help="mixture recipe YAML (see configs/mix/)")
    p.set_defaults(func=_mix)

    p = sub.add_parser("demo", help="End to end: synthetic data, stage 1 + 2 on SmolLM2-135M, evaluation.")
    p.add_argument("--out", default="outputs/demo", help="output folder (summary.json, loss_curve.png)")
    p.add_argument("--configs", default=None, help="folder holding pretrain.yaml and finetune.yaml "
                   "(default: the shipped src/bunny/assets/configs/demo)")
    p.add_argument("--tower", default=None,
                   help="vision tower: a local folder, a hub id (ORG/NAME) or a preset name "
                        "(default: the shipped tower)")
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of a --tower given by hub id (default: main)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a demo setting (train_images=800, see src/bunny/assets/configs/demo/demo.yaml) or a stage recipe "
                        "field (finetune.lr=1e-3); repeatable")
    p.set_defaults(func=_demo)


def _train(args) -> int:
    from bunny.train.recipe import load_recipe, parse_overrides
    from bunny.train.trainer import train

    recipe = load_recipe(args.config, parse_overrides(args.overrides), stage=args.stage)
    result = train(recipe)
    print(json.dumps({"steps": len(result.history), "final_loss": result.history[-1]["loss"] if result.history else None,
                      "wall_seconds": round(result.wall_seconds, 1), "outputs": result.outputs}, indent=1))
    return 0


def _mix(args) -> int:
    from bunny.data.mix import build_mixture

    report = build_mixture(args.recipe)
    print(json.dumps(report, indent=1))
    return 0


def _demo(args) -> int:
    from bunny.errors import BunnyError
    from bunny.model.towers import resolve_tower_source
    from bunny.train.demo import run_demo
    from bunny.train.recipe import parse_overrides

    if args.revision and not args.tower:
        raise BunnyError("--revision applies to a --tower given by hub id; no --tower was given")
    tower = resolve_tower_source(args.tower, args.revision) if args.tower else None
    tokens = [t for kv in args.overrides for t in ("--set", kv)]
    summary = run_demo(args.out, configs=args.configs, tower=tower, overrides=parse_overrides(tokens))
    return 0 if summary else 1
