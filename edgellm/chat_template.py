"""Chat templates rendered in a Jinja sandbox (model files are untrusted, and so are their templates)."""
from __future__ import annotations

import datetime
import json
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError

# Used only when a model carries no template of its own (ChatML is what most small chat models use).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from None


def validate_messages(messages: list[dict[str, Any]]) -> None:
    if not isinstance(messages, list) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TemplateError(f"message {i} must have string 'role' and 'content'")


def render(template: str | None, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "") -> str:
    """Render `messages` with the model's template (ChatML when the model has none)."""
    validate_messages(messages)
    try:
        return _compile(template or CHATML).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template tried something unsafe: {e}") from None
    except Exception as e:  # a template is code: any failure in it is a template error
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def system_prefix(template: str | None, system: str, *, bos_token: str = "", eos_token: str = "") -> str:
    """The rendered text a conversation with this system prompt always starts with.

    Found as the common prefix of two renderings that differ only in the user message, so it
    works for any template without knowing its markup.
    """
    a = render(template, [{"role": "system", "content": system}, {"role": "user", "content": "A"}],
               bos_token=bos_token, eos_token=eos_token)
    b = render(template, [{"role": "system", "content": system}, {"role": "user", "content": "B"}],
               bos_token=bos_token, eos_token=eos_token)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
