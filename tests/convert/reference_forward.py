"""The reference's inference, written out plainly for parity checks: its prompt, its ids
(`tokenizer_image_token`), its pixels (`expand2square` + the tower's processor), its S2
features (every crop through the tower on its own, stitched into a grid, area-pooled as
block means) and its logits (features spliced at the -200 placeholder).

Nothing here calls bunny's model code: the tensors come from the seeded "truth" modules
that the builders wrote into the checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from bunny.model.templates import DEFAULT_SYSTEM
from bunny.testing import random_image

QUESTION = "What is in the image?"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def reference_pixels(truth, image, pad: bool = True) -> torch.Tensor:
    """`pad` mode: expand2square with the mean colour as ints, then the processor; stage 1's
    `square` mode is the processor alone."""
    if pad:
        image = expand2square(image, tuple(int(m * 255) for m in truth.image_processor.image_mean))
    return truth.image_processor(image, return_tensors="pt")["pixel_values"]


def reference_ids(truth, prompt: str) -> list[int]:
    """tokenizer_image_token: each text chunk around <image> tokenized on its own; when the
    first chunk starts with the BOS, that one BOS is kept and every chunk loses its first
    token; -200 between chunks."""
    chunks = [truth.tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    offset = 1 if chunks[0] and chunks[0][0] == truth.tokenizer.bos_token_id else 0
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        ids += ([-200] if i else []) + chunk[offset:]
    return ids


def reference_s2(tower, pixels: torch.Tensor, scales: list[int]) -> torch.Tensor:
    """(B, T, C * len(scales)): the reference's s2wrapper multiscale_forward, plainly."""
    base = scales[0]
    per_scale = []
    for size in scales:
        n = size // base
        x = F.interpolate(pixels.float(), size=(size, size), mode="bicubic")
        rows = []
        for i in range(n):
            row = []
            for j in range(n):
                crop = x[:, :, i * base:(i + 1) * base, j * base:(j + 1) * base]
                feats = tower(crop, output_hidden_states=True).hidden_states[-2]  # (B, g*g, C)
                g = int(feats.shape[1] ** 0.5)
                row.append(feats.reshape(feats.shape[0], g, g, -1))
            rows.append(torch.cat(row, dim=2))
        grid = torch.cat(rows, dim=1)  # (B, n*g, n*g, C)
        b, side, _, c = grid.shape
        g = side // n
        pooled = grid.reshape(b, g, n, g, n, c).mean(dim=(2, 4))  # area pooling = block means
        per_scale.append(pooled.reshape(b, g * g, c))
    return torch.cat(per_scale, dim=-1)


@torch.no_grad()
def reference_image_features(truth, pixel_values: torch.Tensor) -> torch.Tensor:
    """Tower layer -2 (S2 when the checkpoint sets use_s2) -> mlp2x_gelu."""
    if truth.s2_scales:
        features = reference_s2(truth.tower, pixel_values, truth.s2_scales)
    else:
        features = truth.tower(pixel_values, output_hidden_states=True).hidden_states[-2]
    if truth.tower.config.model_type == "clip_vision_model":
        features = features[:, 1:]  # the reference's CLIP tower drops CLS (select_feature "patch")
    p = truth.projector
    return F.linear(F.gelu(F.linear(features, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])


@torch.no_grad()
def reference_logits(truth, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
    """The image features spliced in at -200, then the LLM with positions from 0."""
    features = reference_image_features(truth, pixel_values)
    at = ids.index(-200)
    embed = truth.llm.get_input_embeddings()
    pieces = [embed(torch.tensor(ids[:at], dtype=torch.long)), features[0],
              embed(torch.tensor(ids[at + 1:], dtype=torch.long))]
    embeds = torch.cat(pieces)[None]
    positions = torch.arange(embeds.shape[1])[None]
    return truth.llm(inputs_embeds=embeds, position_ids=positions).logits


def assert_same_tensors(model, truth):
    """Key by key: every tensor of ours equals the one the reference would use."""
    pairs = [(model.language_model, truth.llm.state_dict()), (model.vision_tower, truth.tower.state_dict()),
             (model.mm_projector, truth.projector)]
    for module, expected in pairs:
        ours = module.state_dict()
        assert set(ours) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)


def check_prompt_ids_logits(model, processor, truth, template: str, atol: float | None = None):
    """The reference's prompt, ids, pixels and logits, each compared with ours."""
    image = random_image(3)
    text = processor.apply_chat_template(MESSAGES)
    if template == "plain":
        assert text == f"<image>\n{QUESTION}\n"
    else:
        assert text == f"{DEFAULT_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    ids = reference_ids(truth, text)
    assert ids.count(-200) == 1 and (ids[0] == truth.tokenizer.bos_token_id) == truth.tokenizer.add_bos_token
    assert processor.reference_input_ids(text) == ids
    inputs = processor(text=text, images=[image])
    pixels = reference_pixels(truth, image, pad=template != "plain")  # stage 1 uses `square`
    torch.testing.assert_close(inputs["pixel_values"], pixels, rtol=0, atol=0)
    with torch.no_grad():
        logits = model(**inputs).logits
    tolerance = {} if atol is None else dict(rtol=atol, atol=atol)
    torch.testing.assert_close(logits, reference_logits(truth, ids, pixels), **tolerance)
    assert logits.shape[-1] == len(truth.tokenizer)  # padded vocabulary rows were cut
    return inputs, logits
