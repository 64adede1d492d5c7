"""bunny's conversation templates as Jinja chat templates (`tokenizer.chat_template` in a GGUF),
rendering exactly the text `BunnyProcessor.apply_chat_template` renders.

Message content is a string or a list of parts, as in Hugging Face and OpenAI messages:
`text` parts give their text, `image` parts bunny's `<image>`, `image_url` parts their URL
(llama-cpp-python's LLaVA chat handlers replace the URL with llama.cpp's media marker), and
parts are joined with a newline as bunny joins them. Every piece of output is a quoted
string, so the Jinja environment's whitespace options (trim_blocks, lstrip_blocks) change
nothing.
"""
from __future__ import annotations

import json

from bunny.errors import BunnyError
from bunny.model.templates import IMAGE_PLACEHOLDER, PlainTemplate, Template, get_template

_CONTENT = (
    "{%- macro content(c) -%}"
    "{%- if c is string -%}{{ c }}"
    "{%- else -%}{%- for part in c -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'image' -%}{{ " + json.dumps(IMAGE_PLACEHOLDER) + " }}"
    "{%- elif part['type'] == 'image_url' -%}"
    "{{ part['image_url'] if part['image_url'] is string else part['image_url']['url'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def _two_style(t: Template) -> str:
    q = json.dumps
    user, assistant = t.roles
    return (
        _CONTENT
        + "{%- if messages and messages[0]['role'] == 'system' -%}{{ content(messages[0]['content']) }}"
        + "{%- else -%}{{ " + q(t.system) + " }}{%- endif -%}{{ " + q(t.sep) + " }}"
        + "{%- for m in messages -%}"
        + "{%- if m['role'] == 'user' -%}{{ " + q(user + ": ") + " }}{{ content(m['content']) }}{{ " + q(t.sep) + " }}"
        + "{%- elif m['role'] == 'assistant' -%}{{ " + q(assistant + ": ") + " }}{{ content(m['content']) }}"
        + "{{ " + q(t.sep2) + " }}{%- endif -%}"
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}{{ " + q(assistant + ":") + " }}{%- endif -%}"
    )


def _plain() -> str:
    # Stage-1 prompts: the single question and a newline, no system prompt, no roles.
    return (_CONTENT + "{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
            "{{ content(m['content']) }}{{ '\\n' }}{%- endif -%}{%- endfor -%}")


def chat_template(template_name: str, tokenizer) -> str | None:
    """Jinja for bunny's template `template_name`; `native` is the LLM tokenizer's own template."""
    if template_name == "native":
        return getattr(tokenizer, "chat_template", None)
    t = get_template(template_name)
    if isinstance(t, PlainTemplate):
        return _plain()
    if isinstance(t, Template):
        return _two_style(t)
    raise BunnyError(f"template {template_name!r} has no Jinja form")


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
