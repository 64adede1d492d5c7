"""Images from request URLs, with limits: data: URLs always, http(s) only when allowed.

Every check happens before the pixels are decoded: the byte size of the payload, then the
pixel count read from the image header, so a small file that expands to gigapixels (a
decompression bomb) is refused without allocating it.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from bunny.errors import BunnyError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)$",
                       re.DOTALL)


@dataclass
class ImageLimits:
    max_bytes: int = 10 * 2**20  # per image, encoded
    max_pixels: int = 4096 * 4096  # width * height per image
    max_images: int = 4  # per request
    allow_remote: bool = False
    remote_timeout_s: float = 10.0  # whole download, connection included


def decode_image_bytes(data: bytes, limits: ImageLimits, where: str) -> Image.Image:
    """An RGB image from encoded bytes; refuses non-images and bombs before decoding pixels."""
    if len(data) > limits.max_bytes:
        raise BunnyError(f"{where}: the image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between 1x and 2x its own bomb limit; ours is checked below.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > limits.max_pixels:
                raise BunnyError(f"{where}: the image is {width}x{height} = {width * height} pixels, "
                                 f"over the limit of {limits.max_pixels}")
            image.load()
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BunnyError(f"{where}: the image is too large to decode ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, BunnyError):
            raise
        raise BunnyError(f"{where}: the bytes are not a readable image ({type(exc).__name__})") from None


def decode_data_url(url: str, limits: ImageLimits, where: str) -> bytes:
    match = _DATA_URL.match(url)
    if not match:
        raise BunnyError(f"{where}: malformed data URL (expected data:image/...;base64,...)")
    mime = match["mime"] or ""
    if mime and not mime.startswith("image/"):
        raise BunnyError(f"{where}: data URL type {mime!r} is not an image")
    if not match["b64"]:
        raise BunnyError(f"{where}: only base64 data URLs are supported")
    payload = match["data"]
    if len(payload) * 3 // 4 > limits.max_bytes + 3:  # refuse before decoding
        raise BunnyError(f"{where}: the image is about {len(payload) * 3 // 4} bytes, over the limit of {limits.max_bytes}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BunnyError(f"{where}: malformed base64 in the data URL") from None


async def fetch_remote(url: str, limits: ImageLimits, where: str) -> bytes:
    """Download at most `max_bytes` within `remote_timeout_s`; only when remote images are allowed."""
    if not limits.allow_remote:
        raise BunnyError(f"{where}: remote image URLs are disabled on this server; send a data: URL "
                         "(or start the server with --allow-remote-images)")
    import httpx

    async def download() -> bytes:
        async with httpx.AsyncClient(follow_redirects=True, max_redirects=3, trust_env=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise BunnyError(f"{where}: fetching the image returned HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise BunnyError(f"{where}: the image is {declared} bytes, over the limit of {limits.max_bytes}")
                chunks, total = [], 0
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > limits.max_bytes:
                        raise BunnyError(f"{where}: the image is over the limit of {limits.max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)

    try:
        return await asyncio.wait_for(download(), limits.remote_timeout_s)
    except asyncio.TimeoutError:
        raise BunnyError(f"{where}: fetching the image took longer than {limits.remote_timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise BunnyError(f"{where}: cannot fetch the image ({type(exc).__name__})") from None


async def load_image_url(url: str, limits: ImageLimits, where: str) -> Image.Image:
    if not isinstance(url, str) or not url:
        raise BunnyError(f"{where}: image_url.url must be a non-empty string")
    if url.startswith("data:"):
        data = decode_data_url(url, limits, where)
    elif url.startswith(("http://", "https://")):
        data = await fetch_remote(url, limits, where)
    else:
        raise BunnyError(f"{where}: image URLs must be data: URLs" + (" or http(s)" if limits.allow_remote else ""))
    return await asyncio.to_thread(decode_image_bytes, data, limits, where)
