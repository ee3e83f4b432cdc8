"""The server's default system prompt and its KV state, pinned in the engine so no request re-evaluates it.

A deployed service usually has one system prompt. `edgellm serve --system TEXT` adds it to chat requests
that bring none; its KV state comes from a `cache-prompt` file (`--system-state`, shipped in a Pi bundle so
the board skips that prefill) or is computed once at start-up. Either way every slot that starts a
conversation with that prefix restores the state instead of evaluating it (engine._snapshot).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import CacheError
from ..runtimes.kv_cache import SavedState, read_state_file
from ..session import Session


def system_tokens(session: Session, system: str) -> list[int]:
    """The tokens every chat with this system prompt starts with (what `Session.cache_prompt` caches)."""
    return session.system_tokens(system)


def pinned_state(session: Session, system: str | None, path: str | Path | None,
                 warn: Callable[[str], None]) -> SavedState | None:
    """The state to pin: the file's if it is usable (and made for `system`, when given), else computed
    from `system`, else none. An unusable file is reported through `warn`, not fatal: the state only
    saves time, and a service should not refuse to start over it."""
    saved = None
    if path is not None:
        try:
            saved = read_state_file(Path(path), session.backend.fingerprint)
        except CacheError as e:
            warn(f"not using the system-prompt state {path}: {e}")
    if system is None:
        return saved
    tokens = system_tokens(session, system)
    if saved is not None and saved.tokens != tokens:
        warn(f"not using the system-prompt state {path}: it was made for another system prompt than --system")
        saved = None
    if saved is None:
        session.prefill(tokens)  # sequence 0, before the engine takes the backend over
        saved = SavedState(tokens, session.backend.save_state(), "system")
        session.reset()
    return saved
