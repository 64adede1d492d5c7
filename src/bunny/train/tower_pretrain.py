"""Pre-training the small SigLIP-shaped vision tower that the demo starts from.

Bunny starts from a pretrained SigLIP, whose patch features are already aligned with
language (SigLIP was trained against text), and reads them at hidden_states[-2]. Offline
there is none, so we train a tiny `SiglipVisionModel` on the synthetic scenes of
`bunny.data.synthetic`, against language and against dense labels, all on the layer the LLM
will read (hidden_states[-2]):

- language: a linear head from each patch token to the LLM's own (frozen) input embeddings
  of the words naming the patch's object: its colour word + its shape word + its cell word
  ("red" + "circle" + "left"); background patches to zero. The tower learns features that a
  linear map turns into the words the LLM reads, as SigLIP's are aligned with its text;
  the projector that does this for the demo's LLM is still learned in stage 1, from
  captions (the head is not given to it).
- per patch (linear): colour, shape and cell of the object under the patch, so every
  object token carries colour AND shape together (binding), and its position;
- per image (linear on the mean of the patch tokens): which (colour, shape) pairs are
  present (multi-label) and how many objects of each shape and each colour there are.

Mean pooling plus a linear head only works if the tokens themselves encode the pairs, so
binding cannot hide in a pooling head. The label heads on the last layer (half weight) keep
that layer trained too, for users who read hidden_states[-1].
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from bunny.atomic import atomic_update
from bunny.data.synthetic import (COLOURS, MAX_OBJECTS, PAIRS, POSITIONS, SHAPES,
                                  draw_example)
from bunny.data.synthetic_render import (IMAGE_SIZE, PATCH_SIZE, patch_attribute_labels,
                                         render_with_patch_labels)
from bunny.errors import BunnyError

DEFAULT_STEPS = 1400
DEFAULT_LLM = "smollm2-135m"  # the demo's LLM: the tower is aligned with its word embeddings
TRAIN_SPLIT, EVAL_SPLIT = "tower-train", "tower-eval"  # never the demo's train/eval streams


def default_tower_config(**overrides) -> SiglipVisionConfig:
    """64x64 input, 8x8 patches -> 64 tokens of width 192; 4 layers, so hidden_states[-2]
    is the output of layer 3. No pooling head: Bunny reads patch tokens only."""
    fields = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=3, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                  num_channels=3, vision_use_head=False)
    fields.update(overrides)
    return SiglipVisionConfig(**fields)


def image_processor() -> SiglipImageProcessor:
    """SigLIP preprocessing at 64x64: bicubic resize (the identity on generator images),
    rescale 1/255, mean = std = 0.5."""
    return SiglipImageProcessor(do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                resample=3, do_rescale=True, rescale_factor=1 / 255,
                                do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), as the image processor does it."""
    x = torch.tensor(pixels).permute(0, 3, 1, 2).float() * (1 / 255)  # copies: PIL arrays are read-only
    return (x - 0.5) / 0.5


class TowerHeads(nn.Module):
    """Linear heads on one layer's patch tokens (B, N, D). Background is class 0 of the
    per-patch heads; counts are classes 0..MAX_OBJECTS."""

    def __init__(self, dim: int):
        super().__init__()
        c = MAX_OBJECTS + 1
        self.patch_colour = nn.Linear(dim, len(COLOURS) + 1)
        self.patch_shape = nn.Linear(dim, len(SHAPES) + 1)
        self.patch_position = nn.Linear(dim, len(POSITIONS) + 1)
        self.pairs = nn.Linear(dim, len(PAIRS))
        self.shape_count = nn.Linear(dim, len(SHAPES) * c)
        self.colour_count = nn.Linear(dim, len(COLOURS) * c)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = tokens.mean(dim=1)  # (B, D)
        b, c = tokens.shape[0], MAX_OBJECTS + 1
        return {"patch_colour": self.patch_colour(tokens), "patch_shape": self.patch_shape(tokens),
                "patch_position": self.patch_position(tokens), "pairs": self.pairs(pooled),
                "shape_count": self.shape_count(pooled).view(b, len(SHAPES), c),
                "colour_count": self.colour_count(pooled).view(b, len(COLOURS), c)}


def scene_batch(seed: int, split: str, start: int, size: int) -> dict:
    """Images start..start+size-1 of a generator split, with their labels as tensors, plus
    the scenes and their yes/no questions (for the probe evaluation)."""
    pixels, colour, shape, position, pairs, s_count, c_count, scenes, yes_no = ([] for _ in range(9))
    for i in range(start, start + size):
        scene, qas = draw_example(seed, split, i)
        px, patch_objects = render_with_patch_labels(scene)
        labels = patch_attribute_labels(scene, patch_objects)
        pixels.append(px)
        colour.append(labels["colour"])
        shape.append(labels["shape"])
        position.append(labels["position"])
        pairs.append([float(p in scene.pairs) for p in PAIRS])
        s_count.append([sum(o.shape == s for o in scene.objects) for s in SHAPES])
        c_count.append([sum(o.colour == c for o in scene.objects) for c in COLOURS])
        scenes.append(scene)
        yes_no.append([qa for qa in qas if qa["kind"] == "yes_no"])
    as_long = lambda v: torch.as_tensor(np.array(v), dtype=torch.long)  # noqa: E731
    return {"pixel_values": normalise(np.stack(pixels)), "patch_colour": as_long(colour),
            "patch_shape": as_long(shape), "patch_position": as_long(position),
            "pairs": torch.tensor(pairs), "shape_count": as_long(s_count),
            "colour_count": as_long(c_count), "scenes": scenes, "yes_no": yes_no}


class WordTargets:
    """The LLM's input embeddings of the colour, shape and cell words (row 0: zero, for
    background), indexed by the per-patch class ids of `scene_batch`."""

    def __init__(self, llm: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from bunny.model.embedded import resolve_llm
        from bunny.train.demo_ground import word_tables

        path = resolve_llm(llm)
        embed = AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().weight.detach().float()
        self.llm = llm
        self.colour, self.shape, self.position = word_tables(embed, AutoTokenizer.from_pretrained(path))
        self.dim = embed.shape[1]
        # Mean squared norm of an object patch's target: the loss is relative to it.
        self.scale = float(sum((t[1:] ** 2).sum(-1).mean() for t in (self.colour, self.shape, self.position)))

    def __call__(self, batch: dict) -> torch.Tensor:
        """(B, N, H) targets: colour word + shape word + cell word of each patch's object."""
        return (self.colour[batch["patch_colour"]] + self.shape[batch["patch_shape"]]
                + self.position[batch["patch_position"]])


def words_loss(pred: torch.Tensor, target: torch.Tensor, is_object: torch.Tensor, scale: float) -> torch.Tensor:
    """Squared error per patch relative to `scale` (an object target's mean squared norm):
    the mean over object patches plus the mean over background patches, so a head that
    predicts zero scores ~1 and the few object patches weigh as much as the background."""
    err = ((pred - target) ** 2).sum(-1) / scale  # (B, N)
    obj = is_object.float()
    return (err * obj).sum() / obj.sum().clamp(min=1) + (err * (1 - obj)).sum() / (1 - obj).sum().clamp(min=1)


def heads_loss(pred: dict, batch: dict) -> torch.Tensor:
    ce = lambda logits, y: F.cross_entropy(logits.flatten(0, -2), y.flatten())  # noqa: E731
    return (ce(pred["patch_colour"], batch["patch_colour"])
            + ce(pred["patch_shape"], batch["patch_shape"])
            + ce(pred["patch_position"], batch["patch_position"])
            + F.binary_cross_entropy_with_logits(pred["pairs"], batch["pairs"]) * len(PAIRS) / 4
            + ce(pred["shape_count"], batch["shape_count"])
            + ce(pred["colour_count"], batch["colour_count"]))


def _features(model: SiglipVisionModel, pixel_values: torch.Tensor):
    out = model(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[-2], out.last_hidden_state  # (B, 64, D) each


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def evaluate_tower(model: SiglipVisionModel, heads: TowerHeads, seed: int, n_images: int = 512,
                   batch_size: int = 128, word_head: nn.Linear | None = None,
                   words: WordTargets | None = None) -> dict:
    """Held-out accuracies of the penultimate-layer heads on `n_images` fresh scenes.
    Per-patch accuracies count object patches only (background is most patches).
    Yes/no: the generator's balanced questions answered by the pair head (p > 0.5).
    With `word_head` and `words`: R^2 of the word head on object patches, and how often an
    object patch's prediction is nearest (dot product) its own colour word and its own shape word."""
    if (word_head is None) != (words is None):
        raise BunnyError("evaluate_tower needs both word_head and words, or neither")
    was_training = model.training
    model.eval()
    hits: dict[str, list[float]] = {k: [] for k in (
        "patch_colour", "patch_shape", "patch_position", "background", "shape_count",
        "colour_count", "pairs_all_right", "yes_no", "yes_no_yes", "yes_no_hard", "yes_no_easy",
        "words_nearest_right")}
    sq_err, targets = 0.0, []
    for start in range(0, n_images, batch_size):
        batch = scene_batch(seed, EVAL_SPLIT, start, min(batch_size, n_images - start))
        pen = _features(model, batch["pixel_values"])[0]
        pred = heads(pen)
        obj = batch["patch_colour"] > 0
        if word_head is not None:
            said, want = word_head(pen)[obj], words(batch)[obj]
            sq_err += float(((said - want) ** 2).sum())
            targets.append(want)
            colour_right = (said @ words.colour[1:].T).argmax(-1) + 1 == batch["patch_colour"][obj]
            shape_right = (said @ words.shape[1:].T).argmax(-1) + 1 == batch["patch_shape"][obj]
            hits["words_nearest_right"] += (colour_right & shape_right).float().tolist()
        for key in ("patch_colour", "patch_shape", "patch_position"):
            hits[key] += (pred[key].argmax(-1) == batch[key])[obj].float().tolist()
        hits["background"] += (pred["patch_colour"].argmax(-1) == 0)[~obj].float().tolist()
        for key in ("shape_count", "colour_count"):
            hits[key] += (pred[key].argmax(-1) == batch[key]).float().flatten().tolist()
        present = pred["pairs"].sigmoid() > 0.5
        hits["pairs_all_right"] += (present == batch["pairs"].bool()).all(-1).float().tolist()
        for b, qas in enumerate(batch["yes_no"]):
            for qa in qas:
                said = "yes" if present[b, PAIRS.index((qa["colour"], qa["shape"]))] else "no"
                right = float(said == qa["answer"])
                hits["yes_no"].append(right)
                hits["yes_no_yes" if qa["answer"] == "yes" else f"yes_no_{qa['category']}"].append(right)
    model.train(was_training)
    out = {k: round(sum(v) / len(v), 4) for k, v in hits.items() if v}
    if targets:
        t = torch.cat(targets)
        out["words_r2"] = round(1 - sq_err / float(((t - t.mean(0)) ** 2).sum()), 4)
    return out


def train_tower(out_dir: str | os.PathLike, *, seed: int = 0, steps: int = DEFAULT_STEPS,
                batch_size: int = 32, lr: float = 1e-3, config: SiglipVisionConfig | None = None,
                eval_images: int = 512, num_threads: int | None = 2, progress: bool = True,
                llm: str = DEFAULT_LLM, word_weight: float = 1.0) -> dict:
    """Train the tower from scratch and save it to `out_dir` (config.json,
    model.safetensors, preprocessor_config.json, probe_heads.safetensors,
    pretrain_report.json). `llm` names the LLM whose input word embeddings the tower is
    aligned with (module docstring), `word_weight` the weight of that loss (0: labels only,
    no LLM read). Reproducible: weights from `seed`, batch k is images
    k*batch_size.. of the generator's "tower-train" split with the same seed.
    Returns the report (losses every step, held-out probe accuracies, seconds)."""
    if steps < 1 or batch_size < 1:
        raise BunnyError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if not word_weight >= 0:
        raise BunnyError(f"word_weight must be >= 0, got {word_weight}")
    config = config or default_tower_config()
    if config.image_size != IMAGE_SIZE or config.patch_size != PATCH_SIZE:
        raise BunnyError(f"the generator draws {IMAGE_SIZE}x{IMAGE_SIZE} images with "
                         f"{PATCH_SIZE}-pixel patch labels; config has image_size "
                         f"{config.image_size}, patch_size {config.patch_size}")
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        words = WordTargets(llm) if word_weight > 0 else None
        return _train(out_dir, seed, steps, batch_size, lr, config, eval_images, progress, words, word_weight)
    finally:  # a library call must not leave the process's thread count changed
        torch.set_num_threads(previous_threads)


def _train(out_dir, seed, steps, batch_size, lr, config, eval_images, progress, words: WordTargets | None,
           word_weight: float) -> dict:
    torch.manual_seed(seed)
    model = SiglipVisionModel(config)
    heads = nn.ModuleDict({"penultimate": TowerHeads(config.hidden_size),
                           "last": TowerHeads(config.hidden_size)})
    if words is not None:
        heads["words"] = nn.Linear(config.hidden_size, words.dim)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    model.train()
    losses: list[float] = []
    t0 = time.time()
    bar = tqdm(range(steps), desc="tower", disable=not progress, mininterval=5)
    for step in bar:
        batch = scene_batch(seed, TRAIN_SPLIT, step * batch_size, batch_size)
        pen, last = _features(model, batch["pixel_values"])
        loss = heads_loss(heads["penultimate"](pen), batch) + 0.5 * heads_loss(heads["last"](last), batch)
        if words is not None:
            loss = loss + word_weight * words_loss(heads["words"](pen), words(batch), batch["patch_colour"] > 0,
                                                   words.scale)
        if not torch.isfinite(loss):
            raise BunnyError(f"tower pre-training loss is {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(round(loss.item(), 5))
        if step % 10 == 0:  # refresh=False: the bar redraws at most every mininterval seconds
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False,
                            img_s=f"{(step + 1) * batch_size / (time.time() - t0):.0f}")
    train_seconds = time.time() - t0
    word_head = heads["words"] if words is not None else None
    metrics = (evaluate_tower(model, heads["penultimate"], seed, eval_images, word_head=word_head, words=words)
               if eval_images else {})
    report = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
              "llm": words.llm if words is not None else None, "word_weight": word_weight,
              "num_threads": torch.get_num_threads(), "torch": torch.__version__,
              "train_seconds": round(train_seconds, 1), "eval_images": eval_images,
              "heldout_penultimate_heads": metrics, "losses": losses}
    _save(out_dir, model, heads, report)
    return report


def _save(out_dir, model: SiglipVisionModel, heads: nn.Module, report: dict) -> None:
    """Write the tower's files atomically (other files of the folder, e.g. its README, stay),
    so a killed run never leaves a half-written tower where a good one was."""
    from safetensors.torch import save_file

    with atomic_update(out_dir) as tmp:
        model.save_pretrained(tmp)
        image_processor().save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, tmp / "probe_heads.safetensors")
        # Every 10th loss keeps the file small; the full curve is in the returned report.
        saved = {**report, "losses": None, "loss_every_10_steps": report["losses"][::10]}
        text = json.dumps({k: v for k, v in saved.items() if v is not None}, indent=1)
        (tmp / "pretrain_report.json").write_text(text + "\n")
