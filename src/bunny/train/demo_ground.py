"""Word-grounded projector start for the demo (`projector_word_init: true` in demo.yaml).

Why: a text-only control (benchmarks/demo_text_probe.py) learns the demo's yes/no questions in
~1000 questions when the scene is given as words, while the image demo learns nothing in ~3000:
the LLM matches a question's "green" against a "green" *token* in its context with circuits it
already has, and projected image tokens do not look like any token. So before stage 1 the
projector is set to the least-squares linear map from the tower's patch features to the LLM's
input embeddings of the words that name the patch's object (its colour word + its shape word;
background patches to zero), fitted on scenes drawn from the generator's own `projector-init`
split with its per-patch labels (the labels the tower was pre-trained with). The demo's recipes
then train the projector at 1e-5 only: at stage 1's usual rates captioning through the frozen
LLM pulls image tokens to ~150x the embeddings' norm and the word start is lost (docs/training.md,
runs W-W3: yes/no 52% -> 77.5% when it is kept).

The map is written into the mlp2x_gelu projector exactly: with the first layer [P; -P] and the
second [M, -M], GELU(z) - GELU(-z) = z gives M P x + b for every x. This step uses the
synthetic generator's labels, so it exists only for the demo; the reference has nothing like it.
"""
from __future__ import annotations

import numpy as np
import torch

from bunny.errors import BunnyError


def patch_targets(embed: torch.Tensor, word_ids: dict[str, int], scene, patch_objects: np.ndarray) -> torch.Tensor:
    """(patches, H) targets: embedding(colour word) + embedding(shape word) of the object
    under each patch, zero for background."""
    out = torch.zeros(len(patch_objects), embed.shape[1])
    for p, k in enumerate(patch_objects):
        if k >= 0:
            o = scene.objects[k]
            out[p] = embed[word_ids[o.colour]] + embed[word_ids[o.shape]]
    return out


def word_ids(tokenizer, words) -> dict[str, int]:
    """First token of " word" (as the word appears mid-sentence) for each word."""
    return {w: tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in words}


@torch.no_grad()
def install_linear(proj: torch.nn.Sequential, w: torch.Tensor, b: torch.Tensor) -> None:
    """Make a Linear-GELU-Linear projector compute x @ w + b exactly: first layer [I; -I] on
    2 x d_in of its units (the rest zero), second [w^T, -w^T], since GELU(z) - GELU(-z) = z."""
    first, last = proj[0], proj[2]
    d_in = first.in_features
    if not isinstance(proj[1], torch.nn.GELU) or proj[1].approximate != "none":
        raise BunnyError("install_linear needs the exact (erf) GELU between the two layers")
    if 2 * d_in > first.out_features or w.shape != (d_in, last.out_features):
        raise BunnyError(f"cannot hold a {tuple(w.shape)} map in a projector {d_in} -> "
                         f"{first.out_features} -> {last.out_features}")
    eye = torch.eye(d_in)
    first.weight.zero_()
    first.bias.zero_()
    first.weight[:d_in] = eye.to(first.weight)
    first.weight[d_in:2 * d_in] = -eye.to(first.weight)
    last.weight.zero_()
    last.weight[:, :d_in] = w.T.to(last.weight)
    last.weight[:, d_in:2 * d_in] = -w.T.to(last.weight)
    last.bias.copy_(b.to(last.bias))


@torch.no_grad()
def fit_word_projector(model, tokenizer, seed: int = 0, n_images: int = 384, ridge: float = 1e-3) -> dict:
    """Fit and install the map; returns fit figures (R^2, nearest-word accuracy on held-out
    scenes)."""
    from bunny.data.synthetic import COLOURS, SHAPES, draw_example
    from bunny.data.synthetic_render import render_with_patch_labels
    from bunny.train.tower_pretrain import normalise

    proj = model.mm_projector
    if not (isinstance(proj, torch.nn.Sequential) and len(proj) == 3):
        raise BunnyError(f"projector_word_init needs the mlp2x_gelu projector, got {type(proj).__name__}")
    if model.config.image_token_pool > 1 or model.config.s2_scales:
        raise BunnyError("projector_word_init needs one token per tower patch (image_token_pool 1, no S2)")
    first = proj[0]
    d_in = first.in_features
    embed = model.get_input_embeddings().weight.detach().float().cpu()
    ids = word_ids(tokenizer, COLOURS + SHAPES)

    def features_and_targets(split: str, n: int):
        xs, ys, objs = [], [], []
        for i in range(n):
            scene, _ = draw_example(seed, split, i)
            pixels, patch_objects = render_with_patch_labels(scene)
            x = model._tower_features(normalise(pixels[None]).to(model.vision_tower.device, model.vision_tower.dtype))
            xs.append(x[0].float().cpu())
            ys.append(patch_targets(embed, ids, scene, patch_objects))
            objs.append([(scene.objects[k].colour, scene.objects[k].shape) if k >= 0 else None for k in patch_objects])
        return torch.cat(xs), torch.cat(ys), [o for per in objs for o in per]

    x, y, _ = features_and_targets("projector-init", n_images)
    if x.shape[1] != d_in:
        raise BunnyError(f"tower features are {x.shape[1]} wide, the projector expects {d_in}")
    mean = x.mean(0)
    xc = x - mean
    w = torch.linalg.solve(xc.T @ xc + ridge * len(x) * torch.eye(d_in), xc.T @ (y - y.mean(0)))  # (d_in, d_out)
    b = y.mean(0) - mean @ w
    install_linear(proj, w, b)

    hx, hy, objs = features_and_targets("projector-init-check", 64)
    pred = proj(hx.to(first.weight)).float().cpu()
    r2 = 1 - float(((pred - hy) ** 2).sum() / ((hy - hy.mean(0)) ** 2).sum())
    # Which colour word and which shape word does each object patch's token sit closest to?
    colour_e = torch.stack([embed[ids[c]] for c in COLOURS])
    shape_e = torch.stack([embed[ids[s]] for s in SHAPES])
    right = total = 0
    for token, o in zip(pred, objs):
        if o is None:
            continue
        total += 1
        right += COLOURS[int((colour_e @ token).argmax())] == o[0] and SHAPES[int((shape_e @ token).argmax())] == o[1]
    return {"r2": round(r2, 4), "object_patch_words_right": round(right / max(total, 1), 4), "images": n_images}
