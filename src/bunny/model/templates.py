"""Conversation templates that render exactly the reference's prompt text.

A conversation is a list of (role, text) turns, roles alternating user/assistant and
starting with the user. Text already holds `<image>` placeholders where images go.
"""
from __future__ import annotations

from dataclasses import dataclass

from bunny.errors import BunnyError

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Template:
    """`{system}{sep}USER: {q}{sep}ASSISTANT: {a}{sep2}USER: ...` (the reference's TWO style)."""

    name: str
    sep2: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    system: str = DEFAULT_SYSTEM

    @property
    def stop_strings(self) -> list[str]:
        return [self.sep2]

    def render(self, turns: list[tuple[str, str | None]], system: str | None = None) -> str:
        """Render alternating turns; a final assistant turn of None leaves the prompt open."""
        check_turns(turns)
        out = (self.system if system is None else system) + self.sep
        for i, (role, text) in enumerate(turns):
            tag = self.roles[0] if role == "user" else self.roles[1]
            if text is None:
                out += tag + ":"
            else:
                out += f"{tag}: {text}" + (self.sep if i % 2 == 0 else self.sep2)
        return out

    def answer_spans(self, turns: list[tuple[str, str]], system: str | None = None) -> list[tuple[int, int]]:
        """Character spans of what is trained: each answer and the sep2 after it."""
        spans, pos = [], 0
        check_turns(turns)
        pos = len((self.system if system is None else system) + self.sep)
        for i, (role, text) in enumerate(turns):
            tag = self.roles[0] if role == "user" else self.roles[1]
            head = f"{tag}: "
            if i % 2 == 0:
                pos += len(head + text + self.sep)
            else:
                start = pos + len(head)
                pos = start + len(text) + len(self.sep2)
                spans.append((start, pos))
        return spans


@dataclass(frozen=True)
class PlainTemplate:
    """Stage-1 template: no system prompt, no roles.

    Training renders `<image>{caption}\\n` (the instruction is dropped, only the caption is
    learned); inference renders `<image>\\n{question}\\n`, single turn only.
    """

    name: str = "plain"
    sep2: str = "\n"

    @property
    def stop_strings(self) -> list[str]:
        return ["\n"]

    def render(self, turns, system: str | None = None) -> str:
        check_turns(turns)
        if len(turns) > 2:
            raise BunnyError("template 'plain' renders a single turn only")
        question = turns[0][1]
        if len(turns) == 2 and turns[1][1] is not None:
            return _plain_training_text(question, turns[1][1])
        return question + "\n"

    def answer_spans(self, turns, system: str | None = None) -> list[tuple[int, int]]:
        text = self.render(turns)
        start = text.index(IMAGE_PLACEHOLDER) + len(IMAGE_PLACEHOLDER) if IMAGE_PLACEHOLDER in text else 0
        return [(start, len(text))]


def _plain_training_text(question: str, caption: str) -> str:
    n_images = question.count(IMAGE_PLACEHOLDER)
    if n_images != 1:
        raise BunnyError(f"template 'plain' trains on one image per sample, got {n_images} in {question!r}")
    return IMAGE_PLACEHOLDER + caption + "\n"


def check_turns(turns) -> None:
    if not turns:
        raise BunnyError("a conversation needs at least one user turn")
    for i, (role, text) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise BunnyError(f"turn {i} has role {role!r}; roles must alternate user/assistant starting with user")
        if text is None and i != len(turns) - 1:
            raise BunnyError(f"turn {i} is empty; only the last (assistant) turn may be left open")


TEMPLATES: dict[str, Template | PlainTemplate] = {
    "bunny": Template("bunny", sep2="<|endoftext|>"),
    "phi3": Template("phi3", sep2="<|endoftext|>"),
    "minicpm": Template("minicpm", sep2="</s>"),
    "llama": Template("llama", sep2="<|end_of_text|>"),
    "plain": PlainTemplate(),
    # Ours, not the reference's: `bunny` without the 32-token system prompt (rendered as the
    # reference renders an empty system: " USER: ..."). For short-prompt training on small
    # machines, where the fixed prompt would be a fifth of every sample (the demo).
    "bunny-nosystem": Template("bunny-nosystem", sep2="<|endoftext|>", system=""),
    # `native` uses the LLM tokenizer's own chat template; rendered by the processor.
    "native": None,  # type: ignore[dict-item]
}

# The reference picks the template from the checkpoint's model type, never from a path.
TEMPLATE_BY_REFERENCE_MODEL_TYPE = {
    "bunny-phi": "bunny",
    "bunny-phi3": "phi3",
    "bunny-stablelm": "bunny",
    "bunny-qwen2": "bunny",
    "bunny-minicpm": "minicpm",
    "bunny-llama": "llama",
}


def get_template(name: str):
    if name not in TEMPLATES:
        raise BunnyError(f"unknown template {name!r}; valid names: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
