"""Terminal chat: multi-turn, streamed tokens, image switch and reset commands."""
from __future__ import annotations

import sys
from functools import partial
from typing import Callable, TextIO

from bunny.errors import BunnyError
from bunny.model.generation import SamplingSettings, generate, stream
from bunny.model.images import load_image

HELP = "commands: /image PATH (switch image, starts a new conversation), /reset, /help, /exit"


class ChatSession:
    """One conversation with at most one image, placed in the first user turn as the
    reference does. Switching the image starts a new conversation."""

    def __init__(self, model, processor, settings: SamplingSettings, image_path: str | None = None):
        self.model, self.processor, self.settings = model, processor, settings
        self.messages: list[dict] = []
        self.image = None
        if image_path:
            self.set_image(image_path)

    def set_image(self, path: str) -> None:
        if not getattr(self.model.config, "projector_trained", True):
            raise BunnyError(
                "this model's projector is untrained (a plain LLM composed with a tower): it can chat "
                "about text only; load a trained Bunny checkpoint to ask about images"
            )
        self.image = load_image(path)
        self.messages = []

    def reset(self) -> None:
        self.messages = []

    def _prompt(self, question: str) -> tuple[str, list]:
        content: list[dict] = []
        if self.image is not None and not self.messages:
            content.append({"type": "image"})
        content.append({"type": "text", "text": question})
        self.messages.append({"role": "user", "content": content})
        prompt = self.processor.apply_chat_template(self.messages, add_generation_prompt=True)
        return prompt, [self.image] if self.image is not None else []

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        prompt, images = self._prompt(question)
        run_generate, run_stream = engine_calls(self.model)
        if on_text is None:
            answer = run_generate(self.processor, [prompt], [images], self.settings)[0]
        else:
            pieces = []
            for piece in run_stream(self.processor, prompt, images, self.settings):
                pieces.append(piece)
                on_text(piece)
            answer = "".join(pieces).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def engine_calls(model):
    """(generate, stream) taking (processor, ...) for `model`: a torch Bunny runs
    bunny.model.generation's; an engine (LlamaCppEngine) runs its own."""
    from bunny.serve.llamacpp_engine import LlamaCppEngine

    if isinstance(model, LlamaCppEngine):
        return model.generate, model.stream
    return partial(generate, model), partial(stream, model)


def run_chat(model, processor, settings: SamplingSettings, image: str | None = None,
             prompt: str | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout  # looked up per call (redirectable)
    session = ChatSession(model, processor, settings, image)
    if prompt is not None:  # one-shot, for scripts
        print(session.ask(prompt), file=stdout)
        return 0
    print(HELP, file=stdout)
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/help":
            print(HELP, file=stdout)
            continue
        if line == "/reset":
            session.reset()
            print("(conversation reset)", file=stdout)
            continue
        if line.startswith("/image"):
            try:
                session.set_image(line[len("/image"):].strip())
                print("(new image; conversation reset)", file=stdout)
            except BunnyError as exc:
                print(f"error: {exc}", file=stdout)
            continue
        stdout.write("bunny> ")
        session.ask(line, on_text=lambda s: (stdout.write(s), stdout.flush()))
        stdout.write("\n")
