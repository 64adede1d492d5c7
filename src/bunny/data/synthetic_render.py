"""Drawing synthetic scenes (see `synthetic.py` for the layout rule).

Images are drawn at 4x and box-downsampled to 64x64: anti-aliased edges keep a 16-pixel
triangle distinguishable from a circle, and 64x64 is the tower's input size, so the
processor's resize is the identity and the tower sees exactly the saved pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from bunny.data.synthetic import COLOURS, POSITIONS, SHAPES, Scene

IMAGE_SIZE = 64
PATCH_SIZE = 8
BACKGROUND = (255, 255, 255)
RGB = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 80, 225),
       "yellow": (240, 205, 20), "purple": (140, 45, 180), "orange": (245, 125, 10)}
_SCALE = 4
_CELL = IMAGE_SIZE / 3
# Cell centres (x, y) in 64-pixel units: 3x3 grid, five cells used.
_CENTRE = {"left": (0.5 * _CELL, 1.5 * _CELL), "right": (2.5 * _CELL, 1.5 * _CELL),
           "top": (1.5 * _CELL, 0.5 * _CELL), "bottom": (1.5 * _CELL, 2.5 * _CELL),
           "center": (1.5 * _CELL, 1.5 * _CELL)}
# A patch belongs to an object when the object covers at least this share of it; below
# that the patch is mostly background and its label would be noise.
_MIN_COVER = 0.15

assert set(RGB) == set(COLOURS) and set(_CENTRE) == set(POSITIONS)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    s = _SCALE
    cx, cy, r = cx * s, cy * s, r * s
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.88 * r  # equal-area-ish with the circle so size does not give the shape away
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        h = 1.15 * r  # a triangle inscribed in r looks small; enlarge to match the others
        draw.polygon([(cx, cy - h), (cx + 0.866 * h, cy + 0.5 * h), (cx - 0.866 * h, cy + 0.5 * h)],
                     fill=fill)
    elif shape == "cross":
        t = 0.36 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise AssertionError(shape)


def _canvases(scene: Scene) -> tuple[Image.Image, Image.Image]:
    big = _SCALE * IMAGE_SIZE
    image = Image.new("RGB", (big, big), BACKGROUND)
    labels = Image.new("L", (big, big), 0)  # 0 = background, i + 1 = object i
    d_img, d_lab = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    for i, o in enumerate(scene.objects):
        cx, cy = _CENTRE[o.position]
        cx, cy = cx + o.dx, cy + o.dy
        _draw(d_img, o.shape, cx, cy, o.radius, RGB[o.colour])
        _draw(d_lab, o.shape, cx, cy, o.radius, i + 1)
    return image, labels


def render_scene(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image."""
    image, _ = _canvases(scene)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def render_with_patch_labels(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The image as uint8 (64, 64, 3) and, per 8x8 patch in row-major order (the order of
    SigLIP's patch tokens), the index of the object under it: int64 (64,), -1 = background."""
    image, labels = _canvases(scene)
    pixels = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))
    grid = IMAGE_SIZE // PATCH_SIZE
    side = PATCH_SIZE * _SCALE
    lab = np.asarray(labels).reshape(grid, side, grid, side).transpose(0, 2, 1, 3)
    lab = lab.reshape(grid * grid, side * side)  # (64 patches, pixels per patch)
    n = len(scene.objects)
    cover = np.stack([(lab == i + 1).mean(axis=1) for i in range(n)], axis=1)  # (64, n)
    best = cover.argmax(axis=1)
    patch = np.where(cover.max(axis=1) >= _MIN_COVER, best, -1)
    return pixels, patch.astype(np.int64)


def patch_attribute_labels(scene: Scene, patch_objects: np.ndarray) -> dict[str, np.ndarray]:
    """Per-patch class ids for colour, shape and cell; background is class 0, so the
    attribute at index k of COLOURS / SHAPES / POSITIONS is class k + 1."""
    out = {}
    for name, table in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS)):
        ids = np.array([table.index(getattr(o, name)) + 1 for o in scene.objects] + [0])
        out[name] = ids[patch_objects]  # index -1 picks the trailing background 0
    return out
