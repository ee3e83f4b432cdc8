"""The Jinja sandbox a chat template renders in (model files are untrusted, and so are their templates).

Jinja's immutable sandbox keeps a template away from Python's internals; this module adds a size check on
`*` and `**`. It is what the render child process runs (edgellm.template_worker), which bounds time and
memory; edgellm.chat_template is the API on top.
"""
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


MAX_SEQUENCE = 1 << 24  # a `*` or `**` result beyond this is refused before it is built


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus a size check on `*` and `**` (a quick refusal in the common
    memory bombs; the render process's memory limit catches the rest)."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SEQUENCE:
                    raise jinja2.exceptions.SecurityError("a repeated sequence would be too large")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 4096:
            raise jinja2.exceptions.SecurityError("an exponent is too large")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from None


def render_in_process(template: str | None, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                      bos_token: str = "", eos_token: str = "") -> str:
    """The sandboxed render itself (what the child process runs)."""
    try:
        return _compile(template or CHATML).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token)
    except (TemplateError, MemoryError, RecursionError):  # the render process reports the last two itself
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template tried something unsafe: {e}") from None
    except Exception as e:  # a template is code: any failure in it is a template error
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
