"""Training recipes: one typed, flat dataclass, loaded from commented YAML and overridable
field by field from the command line (`--set lr=1e-3` or `--lr 1e-3`).

Flat on purpose: every field has one unique name, so an override never needs a path and
the saved recipe (recipe.yaml next to every checkpoint) reads like the file it came from.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from bunny.errors import BunnyError

STAGES = ("pretrain", "finetune")
TUNE_MODES = ("projector", "lora", "full")
QUANTIZE_BASE = ("4bit", "8bit")  # recipe field quantize_base ("" = off)


@dataclass
class Recipe:
    # -- what is trained ----------------------------------------------------------------
    stage: str = "finetune"  # pretrain (stage 1) | finetune (stage 2)
    tune: str = "lora"  # projector (stage 1) | lora | full (the LLM's weights)
    # -- model -----------------------------------------------------------------------------
    llm: str = "smollm2-135m"  # embedded name, hub id or local folder of a causal LM
    tower: str = ""  # vision tower (registry name, hub id or folder); "" = the shipped tower
    llm_revision: str = ""  # branch, tag or commit of an `llm` given by hub id ("" = main)
    tower_revision: str = ""  # the same for a `tower` given by hub id
    projector_type: str = "mlp2x_gelu"
    template: str = "bunny"  # the model's chat template (stage 2 trains with it)
    init_from: str = ""  # a checkpoint, or a stage-1 output folder, to start from instead of llm + tower
    projector_weights: str = ""  # stage-1 projector file (mm_projector.safetensors or .bin)
    # Run the tower at this resolution by interpolating its position embeddings (the paper's
    # SigLIP 384 -> 448, 1024 tokens); 0 = the tower's own size. Saved in the model config.
    tower_image_size: int = 0
    # Average k x k patch tokens before the projector (k*k fewer image tokens); 0 = the
    # model's own (1 for a newly built model). Fixed when the model is built.
    image_token_pool: int = 0
    s2_scales: str = ""  # e.g. "384,768,1152": S2 multi-scale features; "" = single scale
    # -- data --------------------------------------------------------------------------------
    data_path: str = ""  # LLaVA-format .json or .jsonl, or shards: .parquet / .tar, a folder, a glob
    image_root: str = ""  # "" = the data file's (or shard's) folder
    data_template: str = ""  # "" = plain for pretrain, `template` for finetune
    image_mode: str = ""  # "" = square for pretrain, pad for finetune
    skip_missing: bool = False  # drop samples whose image is missing (counted, reported)
    group_by_modality_length: bool = False
    max_samples: int = 0  # 0 = all
    # Train each question-answer pair of a multi-turn sample as if it were the only one,
    # behind the shared system prompt and image tokens (for bundles of independent questions
    # about one image, e.g. VQA data; not for dialogues whose turns build on each other).
    independent_turns: bool = False
    model_max_length: int = 2048
    # Pack each micro-batch's samples into rows of up to model_max_length tokens (attention
    # kept within each sample, positions restarting per sample) instead of padding every
    # sample to the longest: the same samples, steps and loss, less padding. A sample longer
    # than model_max_length is an error naming it, not cut (docs/training.md, "Packing").
    packing: bool = False
    # Keep every preprocessed image in memory across epochs: for small data read many times
    # (the demo); off by default because at the paper's scale (695k images at 384 px) it would
    # hold ~1 TB and undo the shards' lazy loading.
    cache_images: bool = False
    # -- optimisation ----------------------------------------------------------------------
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    per_device_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4  # the LLM's (LoRA or full); in stage 1 the projector's
    projector_lr: float = 0.0  # 0 = lr (the paper: 2e-5 in stage 2)
    # Before step 1 of a fresh run, scale the projector's last layer so projected image
    # features have the LLM's mean token-embedding norm (measured on the first batch).
    # A small tower's residual stream can be 50x larger than the LLM's embeddings, which
    # a short stage 1 cannot undo; the reference has no such step (default off).
    projector_norm_init: bool = False
    # After every optimizer step, scale that layer back to the same norm (the same samples), so
    # training moves only the directions of the image tokens. Captioning through a frozen LLM
    # otherwise pulls them to ~20x the embeddings' norm, where its layers barely change them
    # (docs/demo.md, "Stage 1 by the paper's method"). Also not in the reference (default off).
    projector_norm_hold: bool = False
    tower_lr: float = 0.0  # 0 = projector_lr (an unfrozen tower trains at the projector's rate)
    unfreeze_tower: bool = False
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"  # cosine | constant
    max_grad_norm: float = 1.0
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    # -- engine ------------------------------------------------------------------------------
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer of the LLM ("regional": one graph, compiled once, reused
    # by every layer); what it gains on a GPU: docs/benchmarks.md, "Training step". Parameter
    # names and checkpoints are unchanged.
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend (tests use aot_eager: no C compiler)
    bf16: str = "auto"  # auto (bf16 on GPU) | true | false
    deepspeed: str = ""  # path to a DeepSpeed JSON (configs/deepspeed/zero2.json, zero3.json)
    # Fully sharded data parallel (torch's FSDP2 `fully_shard`, per decoder and tower layer):
    # each process holds 1/N of the parameters, gradients and optimizer state. Needs >= 2
    # processes (torchrun / accelerate launch); on one process it trains unsharded, with a note.
    fsdp: bool = False
    # QLoRA (stage 2, tune lora, GPU + bitsandbytes): the frozen LLM loaded as 4bit (NF4, double
    # quantisation, bf16 compute) or 8bit; LoRA and the projector train in full precision. "" = off.
    quantize_base: str = ""
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    seed: int = 0
    # -- outputs -----------------------------------------------------------------------------
    output_dir: str = "outputs/run"
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest checkpoint in output_dir) | none | a checkpoint folder
    save_full_model: bool = True  # write a loadable bunny checkpoint in output_dir/model
    tensorboard: bool = True
    wandb_project: str = ""  # "" = no Weights & Biases
    progress_bar: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _choice("stage", self.stage, STAGES)
        _choice("tune", self.tune, TUNE_MODES)
        _choice("bf16", str(self.bf16).lower(), ("auto", "true", "false"))
        _choice("lr_scheduler", self.lr_scheduler, ("cosine", "constant"))
        if self.image_mode:
            _choice("image_mode", self.image_mode, ("square", "pad"))
        if self.quantize_base:
            _choice("quantize_base", self.quantize_base, QUANTIZE_BASE)
        if self.fsdp and self.deepspeed:
            raise BunnyError(f"the recipe asks for both fsdp and deepspeed ({self.deepspeed}); choose one sharding engine")
        if self.stage == "pretrain" and self.tune != "projector":
            raise BunnyError(f"stage pretrain trains the projector only; got tune={self.tune!r}")
        if self.stage == "finetune" and self.tune == "projector":
            raise BunnyError("stage finetune trains the LLM too: choose tune lora or full")
        for name in ("per_device_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise BunnyError(f"recipe field {name} must be >= 1, got {getattr(self, name)}")
        if self.projector_norm_hold and (self.fsdp or self.deepspeed):
            raise BunnyError("projector_norm_hold rescales the projector in place after every step, which sharded "
                             "parameters (fsdp, deepspeed) do not allow; train without it or unsharded")
        if self.lr <= 0:
            raise BunnyError(f"recipe field lr must be > 0, got {self.lr}")
        if self.init_from and Path(self.init_from).resolve() == Path(self.output_dir).resolve():
            raise BunnyError(f"init_from and output_dir are the same folder ({self.output_dir}): a run writes its "
                             "recipe.yaml and outputs there; choose another output_dir")

    # Resolved defaults that depend on the stage.
    @property
    def effective_data_template(self) -> str:
        return self.data_template or ("plain" if self.stage == "pretrain" else self.template)

    @property
    def effective_image_mode(self) -> str:
        return self.image_mode or ("square" if self.stage == "pretrain" else "pad")

    @property
    def effective_projector_lr(self) -> float:
        return self.projector_lr or self.lr

    @property
    def effective_tower_lr(self) -> float:
        return self.tower_lr or self.effective_projector_lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise BunnyError(f"recipe field {name}={value!r} is not valid; choose one of {', '.join(choices)}")


FIELD_TYPES = {f.name: f.type for f in fields(Recipe)}


def _coerce(name: str, value):
    kind = typing.get_type_hints(Recipe)[name]
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise BunnyError(f"recipe field {name} expects true/false, got {value!r}")
    if kind is str:
        return "" if value is None else str(value).lower() if name == "bf16" else str(value)
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        raise BunnyError(f"recipe field {name} expects {kind.__name__}, got {value!r}") from None


def _check_names(names, where: str) -> None:
    unknown = [n for n in names if n not in FIELD_TYPES]
    if unknown:
        raise BunnyError(f"{where}: unknown recipe field(s) {', '.join(map(repr, unknown))}; "
                         f"valid fields: {', '.join(FIELD_TYPES)}")


def recipe_from_dict(values: dict, where: str = "recipe") -> Recipe:
    _check_names(values, where)
    return Recipe(**{k: _coerce(k, v) for k, v in values.items()})


def parse_overrides(tokens: list[str]) -> dict:
    """`--set k=v`, `--k v`, `--k=v` (dashes or underscores) -> {field: raw value}."""
    out, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--set":
            if i + 1 >= len(tokens) or "=" not in tokens[i + 1]:
                raise BunnyError("--set expects key=value")
            key, value = tokens[i + 1].split("=", 1)
            i += 2
        elif tok.startswith("--"):
            key = tok[2:]
            if "=" in key:
                key, value = key.split("=", 1)
                i += 1
            elif i + 1 < len(tokens):
                value = tokens[i + 1]
                i += 2
            else:
                raise BunnyError(f"{tok} expects a value")
        else:
            raise BunnyError(f"unexpected argument {tok!r}; overrides are --set key=value or --key value")
        key = key.replace("-", "_")
        # Values are read as YAML scalars so "1e-3", "true" and "null" mean what they say.
        out[key] = yaml.safe_load(value) if value != "" else ""
    return out


def load_recipe(path: str | Path | None, overrides: dict | None = None, stage: str | None = None) -> Recipe:
    """Recipe from a YAML file (or defaults), with overrides applied; `stage` is forced by the
    command (`bunny train pretrain` -> pretrain) and must agree with the file if it says."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise BunnyError(f"recipe file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BunnyError(f"{path}: malformed YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise BunnyError(f"{path}: a recipe is a mapping of field: value")
        _check_names(loaded, str(path))
        values.update(loaded)
    if overrides:
        _check_names(overrides, "command line")
        values.update(overrides)
    if stage is not None:
        if values.get("stage", stage) != stage:
            raise BunnyError(f"the recipe says stage {values['stage']!r} but the command is {stage!r}")
        values["stage"] = stage
        if stage == "pretrain":
            values.setdefault("tune", "projector")
    return recipe_from_dict(values, str(path) if path else "recipe")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
