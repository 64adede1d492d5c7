"""bunny's conversation templates as Jinja chat templates, rendering exactly the text
`BunnyProcessor.apply_chat_template` renders; one rendering for every export that carries a
template (the llava-hf folder's `chat_template.jinja`, the GGUF's `tokenizer.chat_template`).

Message content is a string or a list of parts: `text` parts give their text, `image` parts
bunny's `<image>`, joined with a newline as bunny joins them. With `image_url_parts`,
OpenAI-style `image_url` parts give their URL (llama-cpp-python's LLaVA chat handlers replace
it with llama.cpp's media marker); otherwise any other part type is an error. Roles must
alternate user / assistant after an optional system message, as bunny requires. Every piece
of output is a quoted string, so the Jinja environment's whitespace options change nothing.
"""
from __future__ import annotations

import json

from bunny.model.templates import IMAGE_PLACEHOLDER, PlainTemplate, get_template


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=True)  # also a valid Jinja string literal


def _content_macro(image_url_parts: bool) -> str:
    url = ("{%- elif part['type'] == 'image_url' -%}"
           "{{ part['image_url'] if part['image_url'] is string else part['image_url']['url'] }}"
           if image_url_parts else "")
    kinds = "image, image_url or text" if image_url_parts else "image or text"
    return (
        "{%- macro content_text(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{%- for part in content -%}{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
        "{%- if part['type'] == 'image' -%}{{ " + _literal(IMAGE_PLACEHOLDER) + " }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}" + url +
        "{%- else -%}{{ raise_exception('content parts must be of type " + kinds + "') }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
    )


def chat_template(template_name: str, tokenizer, image_url_parts: bool = False) -> str | None:
    """Jinja for bunny's template `template_name`. `native` (the LLM tokenizer's own template)
    is that template on flattened content, or None when the tokenizer has no single one."""
    content = _content_macro(image_url_parts)
    template = get_template(template_name)
    if template is None:  # `native`
        own = tokenizer.chat_template
        if not isinstance(own, str):
            return None
        return (content + "{%- set ns = namespace(messages=[]) -%}"
                "{%- for message in messages -%}"
                "{%- set ns.messages = ns.messages + [{'role': message['role'], "
                "'content': content_text(message['content'])}] -%}"
                "{%- endfor -%}{%- set messages = ns.messages -%}" + own)
    if isinstance(template, PlainTemplate):  # stage 1: one question, a newline; no system prompt, no roles
        return (content +
                "{%- if messages | length != 1 or messages[0]['role'] != 'user' -%}"
                "{{ raise_exception('template plain renders a single user message') }}{%- endif -%}"
                "{{ content_text(messages[0]['content']) }}{{ '\\n' }}")
    user, assistant = template.roles
    return (
        content +
        "{%- set ns = namespace(system=" + _literal(template.system) + ", start=0) -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = content_text(messages[0]['content']) -%}{%- set ns.start = 1 -%}{%- endif -%}"
        "{{ ns.system }}{{ " + _literal(template.sep) + " }}"
        "{%- for message in messages[ns.start:] -%}"
        "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
        "{{ raise_exception('roles must alternate user/assistant starting with user, "
        "after an optional first system message') }}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ " + _literal(user + ": ") + " }}{{ content_text(message['content']) }}{{ " + _literal(template.sep) + " }}"
        "{%- else -%}"
        "{{ " + _literal(assistant + ": ") + " }}{{ content_text(message['content']) }}{{ " +
        _literal(template.sep2) + " }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] == 'user' -%}{{ " + _literal(assistant + ":") +
        " }}{%- endif -%}"
    )
