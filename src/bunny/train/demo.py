"""`bunny demo`: the whole pipeline on a 2-core CPU in minutes.

synthetic scenes -> stage 1 (projector on captions) -> stage 2 (LoRA on every linear layer
of SmolLM2-135M-Instruct + projector) -> held-out evaluation with the real scorers ->
one question about a freshly drawn image -> summary table and outputs/demo/summary.json.

Settings come from src/bunny/assets/configs/demo/{demo,pretrain,finetune}.yaml; on the command line,
`--set train_images=600` changes a demo setting, `--set finetune.lr=1e-3` a stage recipe.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import yaml

from bunny.atomic import atomic_write
from bunny.errors import BunnyError
from bunny.train.recipe import load_recipe

# Shipped as package data, so `bunny demo` works from an installed wheel as from a checkout.
DEMO_CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "configs" / "demo"


@dataclass
class DemoSettings:
    seed: int = 0
    train_images: int = 400
    eval_images: int = 60  # even: hard and easy "no" questions balance
    max_turns: int = 5  # QA turns per stage-2 sample (yes/no pairs kept first)
    yes_no_per_image: int = 1  # yes/no pairs per training image (evaluation: always one)
    train_hard_share: float = 0.75  # share of hard "no" among training yes/no (evaluation: always 0.5)
    short_answer_suffix: bool = False  # append "Answer the question using a single word or phrase."
    eval_batch_size: int = 32
    num_threads: int = 0  # 0 = torch's default (all cores)
    fresh_seed: int = 12345  # seed of the freshly drawn image asked about at the end
    # A shortcut outside the paper's method (on in the shipped demo.yaml; off here, so a
    # demo.yaml without the field runs the paper's method): start the projector from a
    # least-squares map of patch features to the LLM's embeddings of the words naming each
    # patch's object, fitted with the synthetic generator's per-patch labels
    # (bunny/train/demo_ground.py); replaces stage 1's projector_norm_init.
    projector_word_init: bool = False
    word_init_position: bool = False  # also the object's cell word ("left", "top", ...) in its patches' targets
    word_init_position_weight: float = 1.0  # that cell word's weight in the target (with word_init_position)
    word_init_background: str = ""  # background patches -> this word's embedding ("" = zero vector)
    word_init_scale: float = 1.0  # multiplies every word target


def load_settings(configs: Path, overrides: dict) -> tuple[DemoSettings, dict, dict]:
    """Demo settings plus the override dicts for the two stage recipes."""
    path = configs / "demo.yaml"
    values = yaml.safe_load(path.read_text()) if path.is_file() else {}
    stage_over: dict[str, dict] = {"pretrain": {}, "finetune": {}}
    for key, value in overrides.items():
        stage, _, field = key.partition(".")
        if field and stage in stage_over:
            stage_over[stage][field] = value
        else:
            values[key] = value
    valid = [f.name for f in fields(DemoSettings)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        raise BunnyError(f"unknown demo setting(s) {unknown}; valid: {', '.join(valid)} "
                         "(stage recipe fields as pretrain.FIELD or finetune.FIELD)")
    settings = DemoSettings(**{k: _typed(k, v) for k, v in values.items()})
    return settings, stage_over["pretrain"], stage_over["finetune"]


def _typed(name: str, value):
    """The setting's value as its field's type; refuses what would convert silently wrong
    (bool("false") is True, int(2.7) is 2)."""
    kind = type(getattr(DemoSettings, name))
    ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[kind]
    if not isinstance(value, ok) or (kind is not bool and isinstance(value, bool)):
        raise BunnyError(f"demo setting {name} must be {kind.__name__}, got {value!r}")
    return kind(value)


def check_settings(s: DemoSettings) -> None:
    """Refuse settings that make the run impossible, before anything is written or trained."""
    problems = []
    if s.train_images < 1:
        problems.append(f"train_images must be >= 1 (the stages train on them), got {s.train_images}")
    if s.eval_images < 2 or s.eval_images % 2:
        problems.append(f"eval_images must be even and >= 2 (hard and easy \"no\" questions balance), "
                        f"got {s.eval_images}")
    if s.max_turns < 2:
        problems.append(f"max_turns must be >= 2 (each sample keeps its yes/no pair), got {s.max_turns}")
    if s.yes_no_per_image < 1:
        problems.append(f"yes_no_per_image must be >= 1, got {s.yes_no_per_image}")
    if not 0.0 <= s.train_hard_share <= 1.0:
        problems.append(f"train_hard_share must be within [0, 1], got {s.train_hard_share}")
    if s.eval_batch_size < 1:
        problems.append(f"eval_batch_size must be >= 1, got {s.eval_batch_size}")
    if s.num_threads < 0:
        problems.append(f"num_threads must be >= 0 (0: all cores), got {s.num_threads}")
    if problems:
        raise BunnyError("demo settings make the run impossible: " + "; ".join(problems))


def check_stages(s: DemoSettings, r1, r2) -> None:
    """Each stage's sample cap and batch must fit the images the demo draws (stage 1 has
    one caption per training image, stage 2 one sample per training image)."""
    for name, r in (("pretrain", r1), ("finetune", r2)):
        if r.max_samples > s.train_images:
            raise BunnyError(f"{name}.max_samples is {r.max_samples} but the demo draws only "
                             f"train_images={s.train_images} training images (one sample each); "
                             f"lower {name}.max_samples or raise train_images")
        used = r.max_samples or s.train_images  # max_samples 0: all
        batch = r.per_device_batch_size * r.grad_accum
        if used < batch:
            raise BunnyError(f"{name} would see {used} samples, fewer than one batch of {batch} "
                             f"({name}.per_device_batch_size x {name}.grad_accum): no step could be taken")


def run_demo(out: str | Path = "outputs/demo", configs: str | Path | None = None, tower: str | None = None,
             overrides: dict | None = None) -> dict:
    from bunny.data.synthetic_io import SHORT_ANSWER_SUFFIX, synthesize
    from bunny.model.loading import DEFAULT_TOWER, build_model
    from bunny.train.demo_eval import evaluate
    from bunny.train.reporting import plot_losses
    from bunny.train.trainer import train

    start = time.perf_counter()
    out = Path(out)
    configs = Path(configs) if configs else DEMO_CONFIGS
    if not (configs / "pretrain.yaml").is_file():
        raise BunnyError(f"{configs} holds no pretrain.yaml; pass --configs FOLDER (the shipped ones: {DEMO_CONFIGS})")
    settings, over1, over2 = load_settings(configs, overrides or {})
    check_settings(settings)
    tower = tower or DEFAULT_TOWER
    if not (Path(tower) / "config.json").is_file():
        raise BunnyError(f"vision tower {tower} is missing (no config.json); train one with "
                         "`bunny train tower --out PATH` and pass --tower PATH")
    data = out / "data"
    common = {"seed": settings.seed, "tower": tower}
    # Both recipes are read (unknown or wrongly typed fields refused) before any data is written.
    r1 = load_recipe(configs / "pretrain.yaml", {**common, "data_path": str(data / "stage1.json"),
                                                  "output_dir": str(out / "stage1"), **over1}, stage="pretrain")
    r2 = load_recipe(configs / "finetune.yaml", {**common, "data_path": str(data / "stage2.json"),
                                                  "output_dir": str(out / "stage2"), **over2}, stage="finetune")
    check_stages(settings, r1, r2)
    for r in (r1, r2):
        r.resume = "none"  # the demo always starts fresh
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    timings = {}

    _say(f"[1/5] synthetic data (seed {settings.seed}): {settings.train_images} training and "
         f"{settings.eval_images} held-out images")
    t = time.perf_counter()
    meta = synthesize(data, settings.train_images, settings.eval_images, settings.seed, max_turns=settings.max_turns,
                      suffix=SHORT_ANSWER_SUFFIX if settings.short_answer_suffix else "",
                      yes_no_per_image=settings.yes_no_per_image, train_hard_share=settings.train_hard_share)
    shuffle_turns(data / "stage2.json", settings.seed)
    timings["data_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(settings.seed)  # the fresh projector's init, as train() seeds a model it builds
    model, processor = build_model(r1.llm, tower=tower, projector_type=r1.projector_type, template=r2.template,
                                   image_token_pool=r1.image_token_pool or 1)
    timings["load_seconds"] = time.perf_counter() - t
    grounding = None
    if settings.projector_word_init:
        from bunny.train.demo_ground import fit_word_projector

        _say("[1b/5] projector_word_init (a shortcut, not the paper's method): least-squares map of patch "
             "features to the words naming their objects, fitted with the generator's labels")
        grounding = fit_word_projector(model, processor.tokenizer, seed=settings.seed,
                                       position_words=settings.word_init_position,
                                       position_weight=settings.word_init_position_weight,
                                       background_word=settings.word_init_background,
                                       scale=settings.word_init_scale)
        r1.projector_norm_init = False  # the map already has the embeddings' scale
        _say(f"       fit R^2 {grounding['r2']}, object patches nearest their own words: "
             f"{grounding['object_patch_words_right']}")
    _say("[2/5] stage 1: projector on captions (template plain, square images)")
    s1 = train(r1, model, processor)
    _say("[3/5] stage 2: LoRA on every linear layer of the LLM + projector")
    s2 = train(r2, s1.model, processor)
    timings["stage1_seconds"], timings["stage2_seconds"] = s1.wall_seconds, s2.wall_seconds
    model = s2.model
    loss_png = plot_losses({"stage 1 (projector, captions)": [(h["step"], h["loss"]) for h in s1.history],
                            "stage 2 (LoRA + projector, QA)": [(h["step"], h["loss"]) for h in s2.history]},
                           out / "loss_curve.png", "bunny demo: SmolLM2-135M-Instruct + shapes-siglip-64")

    _say(f"[4/5] evaluation on {settings.eval_images} held-out images")
    metrics, predictions = evaluate(model, processor, data, batch_size=settings.eval_batch_size)
    (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))

    _say("[5/5] one question about a freshly drawn image")
    fresh = ask_fresh(model, processor, settings.fresh_seed, out)

    summary = {
        "seed": settings.seed,
        "wall_seconds": round(time.perf_counter() - start, 1),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()},
        "yes_no_colour_only": meta.get("yes_no_colour_only"),
        "yes_no_shape_only": meta.get("yes_no_shape_only"),
        "count_majority": meta.get("count_majority"),
        "stage1": stage_summary(s1, r1),
        "stage2": stage_summary(s2, r2),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "projector_word_init": grounding,
        "fresh_image": fresh,
        "settings": asdict(settings),
        "loss_curve": str(loss_png),
        "model": s2.outputs.get("model"),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_summary(summary)
    return summary


def shuffle_turns(path: Path, seed: int) -> None:
    """Put each sample's QA pairs in a seeded random order, the image before the new first
    question. The generator always starts with the yes/no pair, but evaluation asks every
    question as the first turn; training on every kind of question in that place too
    removes the mismatch."""
    import random

    from bunny.model.templates import IMAGE_PLACEHOLDER

    records = json.loads(path.read_text())
    rng = random.Random(f"bunny-demo-turns/{seed}")
    prefix = IMAGE_PLACEHOLDER + "\n"
    for r in records:
        convs = r["conversations"]
        pairs = [(convs[i]["value"].removeprefix(prefix), convs[i + 1]["value"]) for i in range(0, len(convs), 2)]
        rng.shuffle(pairs)
        r["conversations"] = [turn for k, (q, a) in enumerate(pairs) for turn in (
            {"from": "human", "value": (prefix if k == 0 else "") + q}, {"from": "gpt", "value": a})]
    atomic_write(path, json.dumps(records, indent=1) + "\n")


def ask_fresh(model, processor, seed: int, out: Path) -> dict:
    from bunny.data.synthetic import caption, draw_example
    from bunny.data.synthetic_render import render_scene
    from bunny.model.generation import SamplingSettings, generate
    from bunny.train.demo_eval import prompt_for

    scene, qas = draw_example(seed, "demo-fresh", 0)
    qa = next((q for q in qas if q.get("category") == "colour"), qas[0])
    image = render_scene(scene)
    image.save(out / "fresh_image.png")
    answer = generate(model, processor, [prompt_for(processor, qa["question"])], [image],
                      SamplingSettings(max_new_tokens=8))[0]
    return {"image": str(out / "fresh_image.png"), "scene": caption(scene), "question": qa["question"],
            "expected": qa["answer"], "answer": answer}


def stage_tokens(history: list[dict], per_step: int) -> int:
    """Tokens (attention-mask ones) a stage processed: tokens/s over samples/s is tokens per
    sample, times the samples of a step. What the stage's time on a CPU is proportional to."""
    return round(sum(h["tokens_per_s"] / h["samples_per_s"] * per_step for h in history))


def stage_summary(result, recipe) -> dict:
    """What a stage did: steps, loss at the start and the end (means over the first and the
    last up to 5 steps, since single-batch losses are noisy), seconds, throughput."""
    h = result.history
    return {"steps": len(h), "first_loss": _mean_loss(h[:5]), "final_loss": _mean_loss(h[-5:]),
            "seconds": round(result.wall_seconds, 1), "lr": recipe.lr,
            "samples_per_s": round(result.samples_per_second, 2),
            "tokens": stage_tokens(h, recipe.per_device_batch_size * recipe.grad_accum)}


def _mean_loss(history: list[dict]) -> float | None:
    return round(sum(h["loss"] for h in history) / len(history), 4) if history else None


def _say(text: str) -> None:
    print(text, flush=True)


def print_summary(s: dict) -> None:
    def pct(key):
        v = s.get(key)
        return f"{100 * v:6.1f}%" if isinstance(v, (int, float)) else "    n/a"

    rows = [("yes/no accuracy (target >= 90%)", pct("yes_no_accuracy")),
            ("  yes / easy no / hard no (hard: target >= 80%)",
             f"{pct('yes_no_accuracy_positive')} {pct('yes_no_accuracy_easy')} {pct('yes_no_accuracy_hard')}"),
            ("  colour-only / shape-only guesser", f"{pct('yes_no_colour_only')} {pct('yes_no_shape_only')}"),
            ("  MME existence (acc + acc+, /200)", f"{s.get('mme_existence_acc_plus_acc_plus', 0):7.1f}"),
            ("  POPE F1 random / adversarial", f"{pct('pope_f1_random')} {pct('pope_f1_adversarial')}"),
            ("open-answer accuracy", pct("open_answer_accuracy")),
            ("  colour (target >= 95%)", pct("open_colour_accuracy")),
            ("  shape / count / position (targets >= 80%)",
             f"{pct('open_shape_accuracy')} {pct('open_count_accuracy')} {pct('open_position_accuracy')}"),
            ("  count's answer prior (always the most common count)", pct("count_majority")),
            ("wall time", f"{s['wall_seconds']:.0f} s")]
    stages = [("stage 1 (projector, captions)", s["stage1"]), ("stage 2 (LoRA + projector, QA)", s["stage2"])]
    rows += [(name, f"{st['steps']} steps, loss {st['first_loss']} -> {st['final_loss']}, {st['seconds']:.0f} s")
             for name, st in stages]
    rows.insert(0, ("seed", str(s["seed"])))
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 30))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    f = s["fresh_image"]
    print("=" * (width + 30))
    print(f"fresh image: {f['scene']}\n  Q: {f['question']}\n  A: {f['answer']}   (expected: {f['expected']})")
    print("(stage losses: means of the first and the last 5 steps)")
    print(f"summary: {Path(s['loss_curve']).parent / 'summary.json'}   loss curve: {s['loss_curve']}\n")
