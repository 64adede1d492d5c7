"""`BunnyProcessor`: chat templates, tokenisation with image placeholders, image preprocessing.

A transformers `ProcessorMixin` (tokenizer + image processor), registered with
`AutoProcessor` for `BunnyConfig`: after importing bunny's model code,
`AutoProcessor.from_pretrained(checkpoint)` opens a bunny checkpoint (docs/model.md).
`apply_chat_template(messages, ...)` returns prompt text and
`processor(text=..., images=..., return_tensors="pt")` returns model inputs. Each `<image>`
in the text becomes `image_seq_length` placeholder ids, tokenised around the placeholder
exactly as the reference's `tokenizer_image_token` does (the text between images is
tokenised piece by piece, one BOS kept at the start).

Saved files: the tokenizer's, the image processor's `preprocessor_config.json` and
`bunny_processor.json` (the settings below). The image processor is always loaded on
transformers' PIL backend, as the reference preprocessed images; that is why loading reads
these files itself rather than through ProcessorMixin's `processor_config.json`, which
does not record the backend.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, BatchFeature, ProcessorMixin

from bunny.errors import BunnyError
from bunny.model.config import BunnyConfig
from bunny.model.images import preprocess_images
from bunny.model.templates import IMAGE_PLACEHOLDER, get_template

PROCESSOR_FILE = "bunny_processor.json"
REFERENCE_IMAGE_ID = -200  # the reference's single placeholder id per image
SETTINGS = ("image_seq_length", "image_token_index", "template", "image_mode", "model_max_length", "padding_side")


class BunnyProcessor(ProcessorMixin):
    def __init__(
        self,
        tokenizer,
        image_processor,
        image_seq_length: int,
        image_token_index: int,
        template: str = "bunny",
        image_mode: str = "pad",
        model_max_length: int = 2048,
        padding_side: str = "right",
    ):
        get_template(template)
        super().__init__(tokenizer, image_processor)
        self.image_seq_length = image_seq_length
        self.image_token_index = image_token_index
        self.template = template
        self.image_mode = image_mode
        self.model_max_length = model_max_length
        self.padding_side = padding_side

    @classmethod
    def from_config(cls, config, tokenizer, image_processor) -> "BunnyProcessor":
        if config.s2_scales:  # S2 towers take images at the largest scale and resize inside
            side = max(config.s2_scales)
            image_processor.size = {"height": side, "width": side}
        return cls(
            tokenizer,
            image_processor,
            image_seq_length=config.image_seq_length,
            image_token_index=config.image_token_index,
            template=config.template,
            image_mode=config.image_aspect_ratio,
            model_max_length=config.tokenizer_model_max_length,
            padding_side=config.tokenizer_padding_side,
        )

    # -- prompt text ---------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict], template: str | None = None, add_generation_prompt: bool = True
    ) -> str:
        """Prompt text for Hugging Face chat messages; `{"type": "image"}` parts become `<image>`."""
        name = template or self.template
        system, turns = messages_to_turns(messages)
        if add_generation_prompt and turns and turns[-1][0] == "user":
            turns.append(("assistant", None))
        if name == "native":
            chat = ([{"role": "system", "content": system}] if system is not None else []) + [
                {"role": role, "content": text} for role, text in turns if text is not None
            ]
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        return get_template(name).render(turns, system=system)

    @property
    def stop_strings(self) -> list[str]:
        if self.template == "native":
            return [self.tokenizer.eos_token] if self.tokenizer.eos_token else []
        return get_template(self.template).stop_strings

    def stop_token_ids(self) -> list[int]:
        """EOS plus every stop string that is a single token (e.g. `<|endoftext|>`)."""
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        for stop in self.stop_strings:
            tokens = self.tokenizer(stop, add_special_tokens=False).input_ids
            if len(tokens) == 1:
                ids.add(tokens[0])
        return sorted(ids)

    # -- tokenisation --------------------------------------------------------------------------
    def tokenize(self, text: str, image_id: int | None = None, image_len: int | None = None) -> list[int]:
        """Token ids of one prompt, each `<image>` as `image_len` copies of `image_id`."""
        image_id = self.image_token_index if image_id is None else image_id
        image_len = self.image_seq_length if image_len is None else image_len
        chunks = [self.tokenizer(chunk).input_ids for chunk in text.split(IMAGE_PLACEHOLDER)]
        bos = self.tokenizer.bos_token_id
        offset = 1 if chunks[0] and bos is not None and chunks[0][0] == bos else 0
        ids = [bos] if offset else []
        for i, chunk in enumerate(chunks):
            if i:
                ids.extend([image_id] * image_len)
            ids.extend(chunk[offset:])
        return ids

    def reference_input_ids(self, text: str) -> list[int]:
        """The reference's ids for `text`: one -200 per image (for parity checks)."""
        return self.tokenize(text, image_id=REFERENCE_IMAGE_ID, image_len=1)

    def __call__(
        self,
        text: str | list[str],
        images: list | None = None,
        return_tensors: str = "pt",
        padding_side: str | None = None,
        truncation: bool = False,
        max_length: int | None = None,
    ) -> BatchFeature:
        """Model inputs for one or several prompts.

        images: flat list in placeholder order across the batch, or one list per prompt.
        Prompts longer than `max_length` (default: the model's limit) are an error unless
        `truncation=True`, which cuts the end of the prompt (never inside an image).
        """
        if return_tensors != "pt":
            raise BunnyError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = flatten_images(images, len(texts))
        counts = [t.count(IMAGE_PLACEHOLDER) for t in texts]
        if sum(counts) != len(flat_images):
            raise BunnyError(
                f"the text holds {sum(counts)} <image> placeholders (per prompt: {counts}) "
                f"but {len(flat_images)} images were given"
            )
        limit = max_length or self.model_max_length
        rows = [self._fit(self.tokenize(t), limit, truncation, i) for i, t in enumerate(texts)]
        side = padding_side or self.padding_side
        input_ids, attention_mask = pad_rows(rows, self.pad_token_id, side)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if flat_images:
            data["pixel_values"] = preprocess_images(flat_images, self.image_processor, self.image_mode)
        return BatchFeature(data=data)

    def _fit(self, ids: list[int], limit: int, truncation: bool, index: int) -> list[int]:
        if len(ids) <= limit:
            return ids
        if not truncation:
            raise BunnyError(
                f"prompt {index} is {len(ids)} tokens (images included), longer than the limit of {limit}; "
                "shorten it or pass truncation=True"
            )
        if ids[limit - 1] == self.image_token_index and limit < len(ids) and ids[limit] == self.image_token_index:
            raise BunnyError(f"prompt {index}: truncating to {limit} tokens would cut an image in half")
        return ids[:limit]

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The settings saved in bunny_processor.json (the tokenizer and image processor have
        their own files)."""
        return {name: getattr(self, name) for name in SETTINGS}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> list[str]:
        """Tokenizer files, preprocessor_config.json and bunny_processor.json; returns their paths."""
        if kwargs:
            raise BunnyError(f"BunnyProcessor.save_pretrained: unsupported option(s) {', '.join(sorted(kwargs))}")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        files = [str(p) for p in self.tokenizer.save_pretrained(folder)]
        files += [str(p) for p in self.image_processor.save_pretrained(folder)]
        (folder / PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return files + [str(folder / PROCESSOR_FILE)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, revision: str | None = None,
                        trust_remote_code: bool | None = None, **kwargs) -> "BunnyProcessor":
        """The processor of a bunny checkpoint (local folder or hub id, fetched into the hub
        cache at `revision`). Keyword arguments named in SETTINGS override the saved settings
        (e.g. `template=`). `trust_remote_code` is accepted as AutoProcessor passes it and changes
        nothing: no code from the checkpoint's folder is ever run."""
        from bunny.model.hub import local_or_hub

        kwargs.pop("_from_auto", None)  # set by AutoProcessor.from_pretrained; nothing to do here
        unknown = sorted(set(kwargs) - set(SETTINGS))
        if unknown:
            raise BunnyError(f"BunnyProcessor.from_pretrained: unsupported option(s) {', '.join(unknown)}; "
                             f"valid settings: {', '.join(SETTINGS)} (hub ids use the standard cache and "
                             "HF_TOKEN / HF_HUB_OFFLINE, docs/model.md)")
        folder = local_or_hub(pretrained_model_name_or_path, revision, what="processor")
        settings_file = folder / PROCESSOR_FILE
        if not settings_file.is_file():
            raise BunnyError(f"{folder} holds no {PROCESSOR_FILE}; is it a bunny checkpoint?")
        settings = json.loads(settings_file.read_text()) | kwargs
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
        return cls(tokenizer, image_processor, **settings)


def messages_to_turns(messages: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """Hugging Face chat messages -> (system prompt or None, [(role, text), ...])."""
    system, turns = None, []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BunnyError(f"message {i} must be a dict with 'role' and 'content'")
        role, content = message["role"], message["content"]
        text = content_to_text(content, i)
        if role == "system":
            if i != 0:
                raise BunnyError(f"message {i}: a system message may only come first")
            system = text
        elif role in ("user", "assistant"):
            turns.append((role, text))
        else:
            raise BunnyError(f"message {i} has role {role!r}; valid roles: system, user, assistant")
    return system, turns


def content_to_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BunnyError(f"message {index}: content must be a string or a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_PLACEHOLDER)
        elif kind == "text":
            pieces.append(part.get("text", ""))
        else:
            raise BunnyError(f"message {index}: content part {part!r} is not of type 'image' or 'text'")
    return "\n".join(pieces)


def flatten_images(images, n_texts: int) -> list:
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    if images and all(isinstance(x, (list, tuple)) for x in images):
        if len(images) != n_texts:
            raise BunnyError(f"got {len(images)} image lists for {n_texts} prompts")
        return [img for group in images for img in group]
    return list(images)


def pad_rows(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    if side not in ("left", "right"):
        raise BunnyError(f"padding side {side!r} is not valid; choose left or right")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


AutoProcessor.register(BunnyConfig, BunnyProcessor)
