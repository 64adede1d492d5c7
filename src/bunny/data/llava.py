"""LLaVA-format conversations: loading, validation and tokenisation into (input_ids, labels).

A sample is `{"id", "image"?: str | [str, ...], "conversations": [{"from": "human" | "gpt",
"value": ...}, ...]}` in a JSON list or one per line (JSONL). Text-only samples (no
"image"), multi-turn conversations and several images per sample are all allowed. Sharded
datasets (parquet, webdataset tars) load through `bunny.data.shards`, with the same rules.

Labels come from character offsets: the template says which character spans of the
rendered prompt are answers (each answer plus its end-of-turn `sep2`), the fast tokenizer
says which characters each token covers, and a token is trained iff it overlaps an answer
span. No token counting that can drift out of step with the tokenizer (the reference's
"tokenization mismatch" that silently zeroes a sample).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bunny.errors import BunnyError
from bunny.model.images import ImageRef, preprocess_images
from bunny.model.templates import IMAGE_PLACEHOLDER, get_template

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Conversation:
    id: str
    turns: list[tuple[str, str]]  # (user|assistant, text), alternating, starting with user
    # resolved paths (or lazy `ImageRef`s of sharded datasets), in placeholder order
    images: list[str | ImageRef] = field(default_factory=list)


@dataclass
class LoadReport:
    loaded: int = 0
    skipped_missing: list[tuple[str, str]] = field(default_factory=list)  # (sample id, path or place)

    def summary(self) -> str:
        text = f"{self.loaded} samples loaded"
        if self.skipped_missing:
            shown = ", ".join(f"{i} ({p})" for i, p in self.skipped_missing[:5])
            more = " ..." if len(self.skipped_missing) > 5 else ""
            text += f"; skipped {len(self.skipped_missing)} with a missing image: {shown}{more}"
        return text


def read_records(path: str | Path) -> list[dict]:
    """Raw records of a .json (list) or .jsonl file; malformed JSON names file and line."""
    path = Path(path)
    if not path.is_file():
        raise BunnyError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BunnyError(f"{path}:{lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BunnyError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(records, list):
        raise BunnyError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    return records


def parse_record(record: dict, index: int, image_root: Path | None, where: str) -> Conversation:
    """One validated `Conversation`; image paths resolved against `image_root` (not checked).
    `ImageRef` entries (sharded datasets) are kept as they are."""
    if not isinstance(record, dict):
        raise BunnyError(f"{where}: sample {index} is not an object")
    sample_id = str(record.get("id", index))
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise BunnyError(f"{where}: sample {sample_id!r} has no 'conversations' list")
    turns = []
    for k, msg in enumerate(convs):
        if not isinstance(msg, dict) or msg.get("from") not in ROLES or not isinstance(msg.get("value"), str):
            raise BunnyError(f"{where}: sample {sample_id!r} turn {k} needs 'from' "
                             f"(one of {', '.join(ROLES)}) and a string 'value'")
        role = ROLES[msg["from"]]
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise BunnyError(f"{where}: sample {sample_id!r} turn {k} is from {msg['from']!r} but roles must "
                             "alternate human/gpt starting with human")
        turns.append((role, msg["value"]))
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else list(images)
    if not all(isinstance(i, (str, ImageRef)) for i in images):
        raise BunnyError(f"{where}: sample {sample_id!r} 'image' must be a path or a list of paths")
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if n_placeholders == 0 and len(images) == 1:
        # LLaVA's rule: a single image without a placeholder goes before the first question.
        turns[0] = ("user", IMAGE_PLACEHOLDER + "\n" + turns[0][1])
    elif n_placeholders != len(images):
        raise BunnyError(f"{where}: sample {sample_id!r} has {n_placeholders} <image> placeholders "
                         f"but {len(images)} images")
    root = image_root if image_root is not None else Path(".")
    return Conversation(sample_id, turns, [str(root / p) if isinstance(p, str) else p for p in images])


def load_conversations(path: str | Path, image_root: str | Path | None = None,
                       skip_missing: bool = False) -> tuple[list[Conversation], LoadReport]:
    """Validated conversations of a LLaVA JSON/JSONL file, or of sharded data (a .parquet or
    .tar file, a folder of them or a glob: `bunny.data.shards`).

    `image_root` defaults to the data file's folder. A missing image is an error naming the
    sample and the path, unless `skip_missing`, which drops the sample and reports it.
    """
    from bunny.data.shards import is_sharded, load_shards

    if is_sharded(path):
        return load_shards(path, image_root, skip_missing)
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    samples = ((parse_record(record, i, root, str(path)), f"{path}: sample {i}")
               for i, record in enumerate(read_records(path)))
    return collect_conversations(samples, skip_missing, lambda image: not Path(image).is_file())


def collect_conversations(samples, skip_missing: bool, is_missing) -> tuple[list[Conversation], LoadReport]:
    """The rules every data source shares, over (conversation, where-it-came-from) pairs:
    unique ids (a duplicate names both places), and a missing image (`is_missing(image)`)
    is an error naming the sample and image unless `skip_missing` drops and reports it."""
    report = LoadReport()
    out: list[Conversation] = []
    seen: dict[str, str] = {}
    for conv, place in samples:
        if conv.id in seen:
            raise BunnyError(f"sample id {conv.id!r} appears twice: {seen[conv.id]} and {place}")
        seen[conv.id] = place
        missing = next((str(p) for p in conv.images if is_missing(p)), None)
        if missing is not None:
            if not skip_missing:
                raise BunnyError(f"{place}: sample {conv.id!r}: image not found: {missing} "
                                 "(pass skip_missing / --skip-missing to drop such samples)")
            report.skipped_missing.append((conv.id, missing))
            continue
        out.append(conv)
    report.loaded = len(out)
    return out, report


def tokenize_conversation(conv: Conversation, processor, template: str,
                          max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation rendered with `template`.

    Ids are exactly `processor.tokenize(text)` (each `<image>` expanded to its placeholder
    run, one BOS at the start); labels are -100 except on tokens overlapping an answer span.
    """
    tmpl = get_template(template)
    if tmpl is None:
        raise BunnyError("template 'native' cannot be used for training; pick a named template")
    try:
        text = tmpl.render(conv.turns)
        spans = tmpl.answer_spans(conv.turns)
    except BunnyError as exc:
        raise BunnyError(f"sample {conv.id!r}: {exc}") from None
    # Widen each span over the whitespace before the answer: after "ASSISTANT:" the model
    # must learn to emit " yes", and a tokenizer may make the space a token of its own
    # (SmolLM2 does before digits). The reference trains everything after "ASSISTANT:" too.
    spans = [(_skip_back_whitespace(text, a), b) for a, b in spans]
    tok = processor.tokenizer
    if not getattr(tok, "is_fast", False):
        raise BunnyError("training needs a fast tokenizer (character offsets for the label mask)")
    bos = tok.bos_token_id
    ids: list[int] = []
    labels: list[int] = []
    chunk_start = 0
    offset = None
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids.extend([processor.image_token_index] * processor.image_seq_length)
            labels.extend([IGNORE_INDEX] * processor.image_seq_length)
            chunk_start += len(IMAGE_PLACEHOLDER)
        enc = tok(chunk, return_offsets_mapping=True)
        chunk_ids, offsets = enc.input_ids, enc.offset_mapping
        if offset is None:  # as processor.tokenize: keep one BOS, at the very start
            offset = 1 if chunk_ids and bos is not None and chunk_ids[0] == bos else 0
            if offset:
                ids.append(bos)
                labels.append(IGNORE_INDEX)
        for t, (s, e) in zip(chunk_ids[offset:], offsets[offset:]):
            s, e = s + chunk_start, e + chunk_start
            trained = e > s and any(s < b and e > a for a, b in spans)
            ids.append(t)
            labels.append(t if trained else IGNORE_INDEX)
        chunk_start += len(chunk)
    limit = max_length or processor.model_max_length
    if len(ids) > limit:
        if ids[limit - 1] == processor.image_token_index and ids[limit] == processor.image_token_index:
            raise BunnyError(f"sample {conv.id!r}: {len(ids)} tokens; truncating to {limit} would cut an image")
        ids, labels = ids[:limit], labels[:limit]
    # The model predicts token t from position t-1, so the first token is never a target.
    if all(x == IGNORE_INDEX for x in labels[1:]):
        raise BunnyError(f"sample {conv.id!r} would train on nothing (no answer tokens"
                         f"{' after truncation' if len(ids) == limit else ''}); fix or drop it")
    return ids, labels


_LEADING_IMAGES = re.compile(r"^(?:" + re.escape(IMAGE_PLACEHOLDER) + r"\s*)+")


def tokenize_independent_turns(conv: Conversation, processor, template: str, max_length: int | None = None
                               ) -> tuple[list[int], list[int], list[int], list[int]]:
    """(input_ids, labels, segment_ids, position_ids): every question-answer pair of a
    multi-turn sample trained as if it were the sample's only turn, behind one shared prefix.

    Visual QA data often bundles independent questions about one image in one sample (as
    LLaVA's VQAv2/GQA samples do). Trained as one dialogue, later questions can be answered
    from earlier answers instead of from the image, and their positions differ from a
    single-question prompt's. Here each pair k is rendered alone (system, images, question,
    answer), the token prefix all renders share (system prompt and image tokens) is kept
    once, and each pair's remaining tokens follow as segment k + 1 with the positions they
    have in their own render. The collator lets segment k attend to the prefix and to itself
    only. Costs the same as the dialogue; needs the images at the start of the first
    question (the LLaVA convention). Pairs that do not fit `max_length` are dropped from the end.
    """
    turns = conv.turns
    if len(turns) % 2:
        raise BunnyError(f"sample {conv.id!r}: independent turns need question-answer pairs, got {len(turns)} turns")
    head = _LEADING_IMAGES.match(turns[0][1]) if conv.images else None
    if conv.images and (head is None or sum(t.count(IMAGE_PLACEHOLDER) for _, t in turns)
                        != head.group(0).count(IMAGE_PLACEHOLDER)):
        raise BunnyError(f"sample {conv.id!r}: independent turns need every {IMAGE_PLACEHOLDER} at the start "
                         "of the first question")
    prefix = head.group(0) if head else ""
    pairs = [(turns[0][1][len(prefix):], turns[1][1])] + [(turns[i][1], turns[i + 1][1])
                                                           for i in range(2, len(turns), 2)]
    singles = [tokenize_conversation(Conversation(f"{conv.id}#{k}", [("user", prefix + q), ("assistant", a)],
                                                  conv.images), processor, template)
               for k, (q, a) in enumerate(pairs)]
    shared = len(singles[0][0])
    for ids, _ in singles[1:]:
        shared = next((i for i, (x, y) in enumerate(zip(singles[0][0][:shared], ids)) if x != y),
                      min(shared, len(ids)))
    image_end = max((i + 1 for i, t in enumerate(singles[0][0]) if t == processor.image_token_index), default=0)
    if shared < image_end:
        raise BunnyError(f"sample {conv.id!r}: the questions' renders share only {shared} tokens, fewer than "
                         f"the {image_end} up to the last image token")
    # Answers never go in the prefix (a single pair's render is all "shared").
    shared = min([shared] + [next(i for i, x in enumerate(s_labels) if x != IGNORE_INDEX) for _, s_labels in singles])
    ids, labels = list(singles[0][0][:shared]), list(singles[0][1][:shared])
    segments, positions = [0] * shared, list(range(shared))
    limit = max_length or processor.model_max_length
    for k, (s_ids, s_labels) in enumerate(singles):
        tail = len(s_ids) - shared
        if len(ids) + tail > limit:
            if k == 0:
                raise BunnyError(f"sample {conv.id!r}: its first question alone needs {len(s_ids)} tokens, "
                                 f"more than {limit}")
            break
        ids += s_ids[shared:]
        labels += s_labels[shared:]
        segments += [k + 1] * tail
        positions += range(shared, len(s_ids))
    return ids, labels, segments, positions


def _skip_back_whitespace(text: str, start: int) -> int:
    while start > 0 and text[start - 1] in " \t":
        start -= 1
    return start


def approximate_length(conv: Conversation, image_seq_length: int) -> int:
    """A cheap token-count estimate for length grouping (4 characters per token)."""
    chars = sum(len(t) for _, t in conv.turns)
    return chars // 4 + len(conv.images) * image_seq_length


class ConversationDataset(torch.utils.data.Dataset):
    """Tokenised conversations (all at construction, so a bad sample fails before training)
    with images loaded and preprocessed on access (`square` or `pad`)."""

    def __init__(self, conversations: list[Conversation], processor, template: str, image_mode: str,
                 max_length: int | None = None, cache_images: bool = False, independent_turns: bool = False):
        self.conversations = conversations
        self.processor = processor
        self.image_mode = image_mode
        # independent_turns: (ids, labels, segment_ids, position_ids); else (ids, labels)
        encode = tokenize_independent_turns if independent_turns else tokenize_conversation
        self.encoded = [encode(c, processor, template, max_length) for c in conversations]
        self.cache: dict[int, torch.Tensor] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.conversations)

    @property
    def lengths(self) -> list[int]:
        return [len(e[0]) for e in self.encoded]

    @property
    def has_image(self) -> list[bool]:
        return [bool(c.images) for c in self.conversations]

    def __getitem__(self, i: int) -> dict:
        conv = self.conversations[i]
        ids, labels = self.encoded[i][:2]
        pixels = None
        if conv.images:
            if self.cache is not None and i in self.cache:
                pixels = self.cache[i]
            else:
                try:
                    pixels = preprocess_images(conv.images, self.processor.image_processor, self.image_mode)
                except BunnyError as exc:
                    raise BunnyError(f"sample {conv.id!r}: {exc}") from None
                if self.cache is not None:
                    self.cache[i] = pixels
        item = {"id": conv.id, "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "pixel_values": pixels}
        if len(self.encoded[i]) == 4:
            item["segment_ids"] = torch.tensor(self.encoded[i][2])
            item["position_ids"] = torch.tensor(self.encoded[i][3])
        return item
