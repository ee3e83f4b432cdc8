"""Chat templates rendered in a Jinja sandbox (model files are untrusted, and so are their templates).

The sandbox keeps a template away from Python's internals; edgellm.template_worker bounds its time and
memory by rendering in a child process with a deadline. The built-in ChatML fallback is edgellm's own
text and renders in process.
"""
from __future__ import annotations

import sys
from typing import Any

from .errors import TemplateError
from .template_sandbox import CHATML, render_in_process  # noqa: F401 - CHATML: part of this module's API

# A role is template text, not content: `user<|im_end|>...` as a role would forge turns, so only these pass.
ROLES = ("system", "developer", "user", "assistant", "tool")


def validate_messages(messages: list[dict[str, Any]]) -> None:
    """A non-empty list of {'role', 'content'} with a known role and text that is valid Unicode."""
    if not isinstance(messages, list) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TemplateError(f"message {i} must have string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise TemplateError(f"message {i} has an unknown role {m['role'][:40]!r} "
                                f"(expected one of {', '.join(ROLES)})")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise TemplateError(f"message {i} is not valid Unicode (a lone surrogate at character {e.start})") from None


def render(template: str | None, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "") -> str:
    """Render `messages` with the model's template (ChatML when the model has none).

    A model's own template renders in the bounded child process (edgellm.template_worker): one that
    runs past the deadline or its memory is refused with TemplateError.
    """
    validate_messages(messages)
    request = dict(template=template, messages=messages, add_generation_prompt=add_generation_prompt,
                   bos_token=bos_token, eos_token=eos_token)
    if not template:
        return render_in_process(**request)
    from .template_worker import deadline_s, worker

    try:
        return worker().render(request, deadline_s())
    except OSError as e:  # no child process possible here: the sandbox alone still applies
        _warn_once(f"chat templates render without a time limit ({e})")
        try:
            return render_in_process(**request)
        except (MemoryError, RecursionError) as err:
            raise TemplateError(f"chat template failed: {type(err).__name__}") from None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"edgellm: warning: {message}", file=sys.stderr)


def render_marked(template: str | None, messages: list[dict[str, Any]], marked: list[int], *,
                  add_generation_prompt: bool = True, expected: str, bos_token: str = "",
                  eos_token: str = "") -> list[tuple[str, bool]]:
    """The rendering cut into (text, is_message_content) pieces for the messages numbered in `marked`.

    Each marked message's content is wrapped in markers made of private-use characters and a random
    nonce, the template renders, and the text is cut at the markers. That is only sound if the template
    copies message text through unchanged: with the markers removed, the rendering must equal
    `expected` (the unmarked one); a template that trims or rewrites content fails the check, and such a
    message is refused rather than risk letting its text act as a turn boundary.
    """
    import re
    import secrets

    nonce = "".join(chr(0xE100 + b) for b in secrets.token_bytes(6))
    start, end = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"
    wrapped = [dict(m, content=f"{start}{m['content']}{end}") if i in marked else m for i, m in enumerate(messages)]
    text = render(template, wrapped, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                  eos_token=eos_token)
    parts = re.split(f"({re.escape(start)}|{re.escape(end)})", text)
    pieces: list[tuple[str, bool]] = []
    inside, opened = False, 0
    for part in parts:
        if part == start:
            if inside:
                break
            inside, opened = True, opened + 1
        elif part == end:
            if not inside:
                break
            inside = False
        else:
            pieces.append((part, inside))
    else:
        if not inside and opened == len(marked) and "".join(p for p, _ in pieces) == expected:
            return pieces
    raise TemplateError("a message contains special-token text (e.g. <|im_end|>) and this model's chat template "
                        "changes message text, so it cannot be kept apart from the template's own markup")
