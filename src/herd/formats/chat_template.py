"""Chat templates: herd's chat format as a Jinja `chat_template` for exported checkpoints, and rendering a
checkpoint's own (or a file's) template for models fine-tuned on another format.

Why: transformers' `apply_chat_template`, vLLM and lm-eval's `--apply_chat_template` render prompts from the
tokenizer's `chat_template`; an export without one cannot be chatted with there. `HERD_CHAT_TEMPLATE` renders exactly
what `herd.chat.format_chat` (style "herd", the default) produces, given tokenization of the rendered text with its
special tokens parsed (what those tools do), and `<|image|>` per image for the processor to expand into the tile
layout, as transformers' Llama 4 template does (models/llama4/processing_llama4.py, which this one follows).
Limits of a template: OpenAI's JSON-string tool-call `arguments` are written as they come (herd re-serializes them),
so they match only in json.dumps' own form; an image's tile grid is the processor's business.

`render_text` runs any template in jinja2's sandbox (https://jinja.palletsprojects.com/en/stable/sandbox/), with the
globals transformers provides (`raise_exception`, `strftime_now`, the `tojson` filter); `herd.chat.format_chat`
(template=...) tokenizes the text and lays out each `<|image|>` by its grid. Unlike herd's own renderer, a template
works on text, so special-token text typed by a user becomes that token: use one for checkpoints that need it, not
by default. This module imports nothing from herd (the tokenizer writes the template when it saves).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

# Follows transformers' Llama 4 template; the differences are herd's (see herd.chat): an assistant turn with tool calls
# ends with <|eom|>, "developer" is the system role, an empty tool_calls list is an ordinary turn, system text parts
# are joined before trimming, and an unknown role is an error instead of being dropped.
HERD_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- set roles = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                 "tool": "ipython", "ipython": "ipython"} %}
{%- macro render_content(content) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is not none %}
        {%- for part in content %}
            {%- if part is string %}
                {{- part }}
            {%- elif part.type == "text" %}
                {{- part.text }}
            {%- elif part.type in ("image", "image_url") %}
                {{- "<|image|>" }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools is not defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages and roles.get(messages[0].role) == "system" %}
    {{- "<|header_start|>system<|header_end|>\n\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\n" }}
    {%- endif %}
    {{- render_content(messages[0].content) | trim }}
    {{- "<|eot|>" }}
    {%- set messages = messages[1:] %}
{%- endif %}
{%- if tools is not none %}
    {%- if not messages %}
        {{- raise_exception("tools go into the first user message, and there is none") }}
    {%- endif %}
    {{- "<|header_start|>user<|header_end|>\n\n" }}
    {{- "Given the following functions, please respond with a JSON for a function call with its proper arguments "
        "that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {%- if messages[0].content is string %}
        {{- messages[0].content | trim }}
    {%- else %}
        {{- render_content(messages[0].content) }}
    {%- endif %}
    {{- "<|eot|>" }}
    {%- set messages = messages[1:] %}
{%- endif %}
{%- for message in messages %}
    {%- set role = roles.get(message.role) %}
    {%- if role is none %}
        {{- raise_exception("unknown role " ~ message.role) }}
    {%- elif role == "ipython" %}
        {{- "<|header_start|>ipython<|header_end|>\n\n" }}
        {%- if message.content is string or message.content is mapping or message.content is sequence %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content | string }}
        {%- endif %}
        {{- "<|eot|>" }}
    {%- elif role == "assistant" and message.tool_calls %}
        {{- "<|header_start|>assistant<|header_end|>\n\n<|python_start|>" }}
        {{- render_content(message.content) }}
        {{- "<|python_end|>" }}
        {%- for call in message.tool_calls %}
            {%- set fn = call.function if call.function is defined else call %}
            {%- set args = fn.arguments if fn.arguments is defined else (fn.parameters if fn.parameters is defined
                                                                          else {}) %}
            {{- '{"name": "' + fn.name + '", "parameters": ' }}
            {{- args if args is string else args | tojson }}
            {{- "}" }}
        {%- endfor %}
        {{- "<|eom|>" }}
    {%- else %}
        {{- "<|header_start|>" + role + "<|header_end|>\n\n" }}
        {{- render_content(message.content) }}
        {{- "<|eot|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|header_start|>assistant<|header_end|>\n\n" }}
{%- endif %}
"""


class TemplateError(ValueError):
    """A chat template that cannot be compiled or refused the conversation (the message says which)."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def load_template(spec: str | None, checkpoint_template: str | None) -> str | None:
    """The template `--chat-template` names: None (herd's own format), "checkpoint" (`checkpoint_template`, the one
    its tokenizer files hold), or a file's text. Compiled here, so a broken template fails at start, not per request.
    """
    if spec is None:
        return None
    if spec == "checkpoint":
        if not checkpoint_template:
            raise TemplateError("--chat-template checkpoint: this checkpoint has no chat template (chat_template.jinja "
                                "or tokenizer_config.json's chat_template); pass a template file instead")
        text = checkpoint_template
    else:
        try:
            with open(spec, encoding="utf-8") as f:
                text = f.read((1 << 20) + 1)
        except (OSError, UnicodeDecodeError) as e:
            raise TemplateError(f"--chat-template {spec}: cannot read it ({e}); pass a Jinja template file") from e
        if len(text) > 1 << 20:
            raise TemplateError(f"--chat-template {spec}: over 1 MiB, not a chat template")
    try:
        _compiled(text)
    except Exception as e:  # jinja2.TemplateSyntaxError, with the line
        raise TemplateError(f"chat template {spec}: {e}") from e
    return text


@lru_cache(maxsize=16)
def _compiled(text: str):
    """The template compiled once: SFT renders every conversation's prefixes, a server every request."""
    return _environment().from_string(text)


def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    # transformers' tojson: non-ASCII kept, keys in their order
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def render_text(template: str, messages: Sequence[dict], bos_token: str = "<|begin_of_text|>",
                add_generation_prompt: bool = True, tools: Sequence[dict] | None = None, **extra: Any) -> str:
    """The template's text for a conversation, rendered in jinja2's sandbox."""
    import jinja2

    try:
        return _compiled(template).render(messages=list(messages), bos_token=bos_token,
                               add_generation_prompt=add_generation_prompt,
                               tools=None if tools is None else list(tools), **extra)
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template failed: {e}") from e
