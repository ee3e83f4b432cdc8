"""The app manifest (assets/edgellm/manifest.json, the iOS bundle's manifest.json) and its parts.

An app knows its model only through this file: the model's files and sha256, the runtime and its
version, the execution provider and thread count edgellm's plan picked for the phone class, the
context size, and the chat template rendered into three text pieces the C engine concatenates
(system_text + user + turn_suffix, then turn_prefix + user + turn_suffix per later turn). Rendering
the template here, with edgellm's sandboxed Jinja, keeps a template interpreter out of the app.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import chat_template
from ..errors import TemplateError, UnsupportedModelError

FORMAT = "edgellm-app"
VERSION = 1
_U1, _A1, _U2 = "\ue000edgellm-user-1\ue000", "\ue000edgellm-answer-1\ue000", "\ue000edgellm-user-2\ue000"


@dataclass(frozen=True)
class ChatPieces:
    system: str          # the system prompt as given ("" = the template's default)
    system_text: str     # the conversation's fixed start: system prompt and the first turn's opening
    turn_prefix: str     # closes an answer and opens the next user turn
    turn_suffix: str     # closes a user turn and opens the answer

    def to_dict(self) -> dict:
        return asdict(self)


def chat_pieces(template: str | None, system: str | None, *, bos_token: str = "", eos_token: str = "") -> ChatPieces:
    """Split the model's chat template into the pieces the engine needs, by rendering conversations
    with marker texts and cutting at the markers (works for any template that renders turns in order)."""
    head = [{"role": "system", "content": system}] if system else []
    kw = {"bos_token": bos_token, "eos_token": eos_token}
    one = chat_template.render(template, [*head, {"role": "user", "content": _U1}], **kw)
    two = chat_template.render(template, [*head, {"role": "user", "content": _U1},
                                          {"role": "assistant", "content": _A1},
                                          {"role": "user", "content": _U2}], **kw)
    if one.count(_U1) != 1 or two.count(_U2) != 1 or two.count(_A1) != 1:
        raise TemplateError("the chat template does not render each message exactly once: the app cannot use it")
    system_text, turn_suffix = one.split(_U1)
    between = two.split(_A1)[1].split(_U2)[0]
    if not two.startswith(one) or not two.startswith(f"{one}{_A1}"):
        # a template that re-renders history differently (e.g. drops reasoning) cannot continue a KV cache
        raise UnsupportedModelError("the chat template renders earlier turns differently from a new turn; "
                                    "the app's incremental chat cannot follow it")
    return ChatPieces(system or "", system_text, between, turn_suffix)


def file_digests(paths: list[Path]) -> dict[str, str]:
    """sha256 per file; a directory (an .mlpackage) hashes its files' relative paths and contents in order."""
    out = {}
    for p in paths:
        h = hashlib.sha256()
        members = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in members:
            if p.is_dir():
                h.update(f"{q.relative_to(p).as_posix()}\0".encode())
            with open(q, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def model_digest(digests: dict[str, str]) -> str:
    """One sha256 for a set of files (names and contents): names the app's model folder."""
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(digests.items())).encode()).hexdigest()


def build(*, model_name: str, model_format: str, files: list[Path], runtime: dict, chat: ChatPieces,
          plan: dict, fit: dict, system_state: dict | None = None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        edgellm_version = version("edgellm")
    except PackageNotFoundError:  # a source tree without an install
        edgellm_version = "0+unknown"
    digests = file_digests(files)
    digest = model_digest(digests)
    return {
        "format": FORMAT, "version": VERSION,
        "model": {"name": model_name, "format": model_format, "sha256": digest,
                  "bytes": sum(_size(p) for p in files), "files": digests},
        "model_dir": f"model-{digest[:12]}",
        "files": [p.name for p in files],
        "runtime": runtime,
        "chat": chat.to_dict(),
        "system_state": system_state,
        "plan": plan,
        "memory": fit,
        "edgellm": {"version": edgellm_version, "created": int(time.time())},
    }


def _size(p: Path) -> int:
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file()) if p.is_dir() else p.stat().st_size


def write(manifest: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
