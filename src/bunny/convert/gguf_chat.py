"""What a GGUF carries of bunny's conversation template: the Jinja chat template
(`tokenizer.chat_template`, from bunny.convert.jinja_chat) and the end-of-turn token."""
from __future__ import annotations

from bunny.convert import jinja_chat
from bunny.model.templates import get_template


def chat_template(template_name: str, tokenizer) -> str | None:
    """bunny.convert.jinja_chat's template, with `image_url` parts (llama-cpp-python's LLaVA
    handlers pass images that way); None for a `native` template the tokenizer lacks."""
    return jinja_chat.chat_template(template_name, tokenizer, image_url_parts=True)


def stop_token_id(template_name: str, tokenizer) -> int | None:
    """The template's end-of-answer string (sep2) when it is one special token other than EOS:
    llama.cpp must stop there as bunny does (written as the end-of-turn token). The plain
    template's newline is an ordinary token: llama.cpp callers pass it as a stop string."""
    if template_name == "native":
        return None
    stop = get_template(template_name).sep2
    ids = tokenizer(stop, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] == tokenizer.eos_token_id:
        return None
    added = tokenizer.added_tokens_decoder.get(ids[0])
    return ids[0] if added is not None and added.special else None
