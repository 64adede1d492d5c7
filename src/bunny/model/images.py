"""Image loading and the reference's two preprocessing modes.

`pad`: the image is centred on a square canvas filled with the processor's mean colour as
integers (`int(m * 255)`), then the tower's processor resizes it. `square`: a plain resize
(the tower's processor alone). The tower's processor runs on the PIL backend, as the
reference's did, so pixel values match it.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from bunny.errors import BunnyError


class ImageRef:
    """An image stored elsewhere (a tar member, a parquet cell), read only when needed.

    Subclasses implement `read() -> bytes` and `__str__` (where the image is, for error
    messages); `load_image` and `preprocess_images` accept them like paths.
    """

    def read(self) -> bytes:
        raise NotImplementedError

    def open(self) -> Image.Image:
        return load_image(self)


def load_image(image) -> Image.Image:
    """A PIL image from a PIL image, a file path, encoded bytes or an `ImageRef`; a missing
    or corrupt image names itself."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise BunnyError(f"image file not found: {path}")
        return _decode(path, f"file {path}")
    if isinstance(image, ImageRef):
        return _decode(io.BytesIO(image.read()), str(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(image)), f"({len(image)} bytes)")
    raise BunnyError(f"expected a PIL image or an image path, got {type(image).__name__}")


def _decode(source, where: str) -> Image.Image:
    try:
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BunnyError(f"cannot read image {where}: {exc}") from None


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre `image` on a square canvas of colour `fill` (the reference's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, int, int]:
    return tuple(int(m * 255) for m in image_processor.image_mean)


def preprocess_images(images: list, image_processor, mode: str) -> torch.Tensor:
    """(N, 3, H, W) float pixel values for a list of images in mode `pad` or `square`."""
    if mode not in ("pad", "square"):
        raise BunnyError(f"image mode {mode!r} is not valid; choose pad or square")
    pil_images = [load_image(img) for img in images]
    if mode == "pad":
        fill = mean_colour(image_processor)
        pil_images = [expand_to_square(img, fill) for img in pil_images]
    return image_processor(pil_images, return_tensors="pt")["pixel_values"]
