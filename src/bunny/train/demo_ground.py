"""Word-grounded projector start for the demo: an option (`projector_word_init: true`, on in
the shipped demo.yaml) and a shortcut outside the paper's method.

The projector is set to the least-squares linear map from the tower's patch features to the
LLM's input embeddings of the words that name the patch's object (its colour word + its
shape word, optionally + a weighted cell word; background patches to zero), fitted on scenes
drawn from the generator's own `projector-init` split with its per-patch labels. The paper has
nothing like it: there the projector starts random and learns from captions in stage 1 (the
demo with `projector_word_init: false`). Why the option exists: the LLM matches a question's
"green" against a "green" *token* in its context with circuits it already has, so image tokens
that start next to their words give stage 2 a head start (benchmarks/demo_text_probe.py is the
text-only control).
With this start, keep stage 1 and the stage-2 projector at a low rate (~1e-5): at stage 1's
usual rates captioning through the frozen LLM pulls image tokens to ~150x the embeddings'
norm and the word start is lost (docs/training.md).

The map is written into the mlp2x_gelu projector exactly: with the first layer [P; -P] and the
second [M, -M], GELU(z) - GELU(-z) = z gives M P x + b for every x. This step uses the
synthetic generator's labels, so it exists only for the demo.
"""
from __future__ import annotations

import math

import torch

from bunny.errors import BunnyError
from bunny.model.modeling import pool_tokens


def word_tables(embed: torch.Tensor, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings of the colour, shape and position words, row 0 zero: indexed by the
    per-patch class ids of `tower_pretrain.scene_batch` (0 = background, k + 1 = COLOURS[k],
    SHAPES[k] or POSITIONS[k])."""
    from bunny.data.synthetic import COLOURS, POSITIONS, SHAPES

    ids = word_ids(tokenizer, COLOURS + SHAPES + POSITIONS)
    zero = torch.zeros(1, embed.shape[1])
    return tuple(torch.cat([zero, embed[[ids[w] for w in words]]]) for words in (COLOURS, SHAPES, POSITIONS))


def patch_targets(colour_table: torch.Tensor, shape_table: torch.Tensor, patch_colour: torch.Tensor,
                  patch_shape: torch.Tensor, position_table: torch.Tensor | None = None,
                  patch_position: torch.Tensor | None = None, background: torch.Tensor | None = None,
                  position_weight: float = 1.0) -> torch.Tensor:
    """(..., H) targets: embedding(colour word) + embedding(shape word) of the object under
    each patch (+ position_weight x embedding(position word) when `position_table` is given);
    background patches (class 0) get `background`, or zero."""
    out = colour_table[patch_colour] + shape_table[patch_shape]
    if position_table is not None:
        out = out + position_weight * position_table[patch_position]
    if background is not None:
        out = torch.where((patch_colour == 0).unsqueeze(-1), background.to(out), out)
    return out


def word_ids(tokenizer, words) -> dict[str, int]:
    """The token of " word" (as the word appears mid-sentence) for each word; a word the
    tokenizer splits has no single embedding to aim at and is refused."""
    out = {}
    for w in words:
        ids = tokenizer(" " + w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise BunnyError(f"word {w!r} is {len(ids)} tokens for this tokenizer ({ids}); the word-grounded "
                             "start needs words of one token")
        out[w] = ids[0]
    return out


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
def fit_word_projector(model, tokenizer, seed: int = 0, n_images: int = 384, ridge: float = 1e-3,
                       position_words: bool = False, background_word: str = "", scale: float = 1.0,
                       position_weight: float = 1.0) -> dict:
    """Fit and install the map; returns fit figures (R^2, nearest-word accuracy on held-out
    scenes). `position_words` adds the object's cell word ("left", "top", ...) to its patches'
    targets, times `position_weight`; `background_word` gives background patches that word's
    embedding instead of zero (a zero token is all noise after the LLM's first RMSNorm); `scale`
    multiplies every target."""
    proj = model.mm_projector
    if not (isinstance(proj, torch.nn.Sequential) and len(proj) == 3):
        raise BunnyError(f"projector_word_init needs the mlp2x_gelu projector, got {type(proj).__name__}")
    if model.config.s2_scales:
        raise BunnyError("projector_word_init needs the tower's own patch grid (no S2)")
    if scale <= 0:
        raise BunnyError(f"word-init scale must be positive, got {scale}")
    if position_weight <= 0:
        raise BunnyError(f"word-init position weight must be positive, got {position_weight}")
    pool = model.config.image_token_pool
    first = proj[0]
    d_in = first.in_features
    embed = model.get_input_embeddings().weight.detach().float().cpu()
    colour_table, shape_table, position_table = word_tables(embed, tokenizer)
    background = embed[word_ids(tokenizer, [background_word])[background_word]] if background_word else None

    def targets(batch_labels):
        colour, shape, position = batch_labels
        return scale * patch_targets(colour_table, shape_table, colour, shape,
                                     position_table if position_words else None, position, background,
                                     position_weight)

    x, labels = _projector_inputs_and_labels(model, seed, "projector-init", n_images)
    x, y = x.flatten(0, 1), _pooled(targets(labels), pool)
    if x.shape[1] != d_in:
        raise BunnyError(f"tower features are {x.shape[1]} wide, the projector expects {d_in}")
    mean = x.mean(0)
    xc = x - mean
    w = torch.linalg.solve(xc.T @ xc + ridge * len(x) * torch.eye(d_in), xc.T @ (y - y.mean(0)))  # (d_in, d_out)
    b = y.mean(0) - mean @ w
    install_linear(proj, w, b)

    hx, labels = _projector_inputs_and_labels(model, seed, "projector-init-check", 64)
    hy = _pooled(targets(labels), pool)
    pred = proj(hx.flatten(0, 1).to(first.weight)).float().cpu()
    r2 = 1 - float(((pred - hy) ** 2).sum() / ((hy - hy.mean(0)) ** 2).sum())
    aligned = _nearest_words(pred, labels, pool, colour_table, shape_table)
    colour, _, pure = token_labels(labels[0], labels[1], pool)
    mixed = float(((colour > 0) & ~pure).sum() / (colour > 0).sum())
    return {"r2": round(r2, 4), "object_patch_words_right": aligned["both"], "images": n_images,
            "object_tokens_mixed": round(mixed, 4), "image_token_pool": pool,
            "position_words": position_words, "position_weight": position_weight,
            "background_word": background_word, "scale": scale}


def _projector_inputs_and_labels(model, seed: int, split: str, n: int):
    """What the projector reads for `n` scenes of the generator's `split` (`projector_inputs`:
    tower features, pooled as the model pools them; (n, tokens, d_in), float32 on the CPU) and
    their per-patch colour, shape, cell class ids (n, patches): the tower's own pre-training
    renderer and labels."""
    from bunny.train.tower_pretrain import scene_batch

    batch = scene_batch(seed, split, 0, n)
    with torch.no_grad():
        x = torch.cat([model.projector_inputs(px.to(model.device)).float().cpu()
                       for px in batch["pixel_values"].split(64)])
    return x, (batch["patch_colour"], batch["patch_shape"], batch["patch_position"])


def _pooled(t: torch.Tensor, pool: int) -> torch.Tensor:
    """Per-patch targets pooled as the model pools image tokens (image_token_pool); a linear map
    commutes with the mean, so pooled features map to pooled targets."""
    return (pool_tokens(t, pool) if pool > 1 else t).flatten(0, 1)


def _nearest_words(tokens: torch.Tensor, labels, pool: int, colour_table: torch.Tensor,
                   shape_table: torch.Tensor) -> dict[str, float]:
    """Shares of object tokens whose largest dot product among the colour words is their own
    colour's, among the shape words their own shape's, and both. (Pooled tokens count when
    their object patches all show one colour-shape pair.)"""
    colour, shape, pure = token_labels(labels[0], labels[1], pool)
    obj = (colour > 0) & pure
    right_colour = (tokens[obj] @ colour_table[1:].T).argmax(-1) + 1 == colour[obj]
    right_shape = (tokens[obj] @ shape_table[1:].T).argmax(-1) + 1 == shape[obj]
    return {name: round(v.float().mean().item(), 4)
            for name, v in (("colour", right_colour), ("shape", right_shape), ("both", right_colour & right_shape))}


@torch.no_grad()
def word_alignment(model, tokenizer, seed: int = 0, n_images: int = 64) -> dict[str, float]:
    """How word-like the projector's image tokens are, whatever made it: on `n_images` scenes
    of the generator's `projector-init-check` split, the shares of object tokens nearest (dot
    product) their own colour word, their own shape word, and both (chance: 1/6, 1/4, 1/24).
    The LLM can match a question's words against tokens like these with circuits it already
    has (the word-fit start puts ~97% of them nearest both)."""
    embed = model.get_input_embeddings().weight.detach().float().cpu()
    colour_table, shape_table, _ = word_tables(embed, tokenizer)
    x, labels = _projector_inputs_and_labels(model, seed, "projector-init-check", n_images)
    weight = next(model.mm_projector.parameters())
    tokens = model.mm_projector(x.flatten(0, 1).to(weight.device, weight.dtype)).float().cpu()
    return _nearest_words(tokens, labels, model.config.image_token_pool, colour_table, shape_table)


def token_labels(colour: torch.Tensor, shape: torch.Tensor, pool: int) -> tuple[torch.Tensor, ...]:
    """Per image token (flattened over images): the colour and shape class of its object
    patches and whether they all agree ("pure"); with pool 1 every token is pure. A block
    with no object patch is background (0, 0, pure)."""
    n, length = colour.shape
    g = math.isqrt(length)
    pair = (colour * 100 + shape).view(n, g // pool, pool, g // pool, pool).permute(0, 1, 3, 2, 4)
    pair = pair.reshape(-1, pool * pool)
    top = pair.max(-1).values  # an object patch's pair if any (background is 0)
    pure = ((pair == top[:, None]) | (pair == 0)).all(-1)
    return top // 100, top % 100, pure
