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

import torch

from bunny.errors import BunnyError


def word_tables(embed: torch.Tensor, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the colour words and of the shape words, row 0 zero: indexed by the
    per-patch class ids of `tower_pretrain.scene_batch` (0 = background, k + 1 = COLOURS[k]
    or SHAPES[k])."""
    from bunny.data.synthetic import COLOURS, SHAPES

    ids = word_ids(tokenizer, COLOURS + SHAPES)
    zero = torch.zeros(1, embed.shape[1])
    return (torch.cat([zero, embed[[ids[c] for c in COLOURS]]]), torch.cat([zero, embed[[ids[x] for x in SHAPES]]]))


def patch_targets(colour_table: torch.Tensor, shape_table: torch.Tensor, patch_colour: torch.Tensor,
                  patch_shape: torch.Tensor) -> torch.Tensor:
    """(..., H) targets: embedding(colour word) + embedding(shape word) of the object under
    each patch, zero for background (class 0 in both)."""
    return colour_table[patch_colour] + shape_table[patch_shape]


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
    from bunny.train.tower_pretrain import scene_batch

    proj = model.mm_projector
    if not (isinstance(proj, torch.nn.Sequential) and len(proj) == 3):
        raise BunnyError(f"projector_word_init needs the mlp2x_gelu projector, got {type(proj).__name__}")
    if model.config.image_token_pool > 1 or model.config.s2_scales:
        raise BunnyError("projector_word_init needs one token per tower patch (image_token_pool 1, no S2)")
    first = proj[0]
    d_in = first.in_features
    colour_table, shape_table = word_tables(model.get_input_embeddings().weight.detach().float().cpu(), tokenizer)
    tower = model.vision_tower

    def features_and_labels(split: str, n: int):
        """Tower features (n * patches, d_in), per-patch colour and shape class ids."""
        batch = scene_batch(seed, split, 0, n)  # the tower's own pre-training renderer and labels
        x = torch.cat([model._tower_features(px.to(tower.device, tower.dtype)).float().cpu()
                       for px in batch["pixel_values"].split(64)])
        return x.flatten(0, 1), batch["patch_colour"].flatten(), batch["patch_shape"].flatten()

    x, colour, shape = features_and_labels("projector-init", n_images)
    y = patch_targets(colour_table, shape_table, colour, shape)
    if x.shape[1] != d_in:
        raise BunnyError(f"tower features are {x.shape[1]} wide, the projector expects {d_in}")
    mean = x.mean(0)
    xc = x - mean
    w = torch.linalg.solve(xc.T @ xc + ridge * len(x) * torch.eye(d_in), xc.T @ (y - y.mean(0)))  # (d_in, d_out)
    b = y.mean(0) - mean @ w
    install_linear(proj, w, b)

    hx, colour, shape = features_and_labels("projector-init-check", 64)
    hy = patch_targets(colour_table, shape_table, colour, shape)
    pred = proj(hx.to(first.weight)).float().cpu()
    r2 = 1 - float(((pred - hy) ** 2).sum() / ((hy - hy.mean(0)) ** 2).sum())
    # Do object patches' tokens sit closest to their own colour word and their own shape word?
    obj = colour > 0
    nearest_colour = (pred[obj] @ colour_table[1:].T).argmax(-1) + 1
    nearest_shape = (pred[obj] @ shape_table[1:].T).argmax(-1) + 1
    right = ((nearest_colour == colour[obj]) & (nearest_shape == shape[obj])).float().mean().item()
    return {"r2": round(r2, 4), "object_patch_words_right": round(right, 4), "images": n_images}
