"""The app's C engine (native/edgellm_engine.h) driven from Python through ctypes, on the host.

The packager uses it to compute the shipped system-prompt state with the exact code and llama.cpp
version the app runs; the tests use it to check that code's answers (against edgellm's Python
runtime, cold against restored) and to time it.
"""
from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ContextOverflowError, PackagingError
from .manifest import ChatPieces

STATE_NONE, STATE_RESTORED, STATE_REFUSED = 0, 1, 2


class _Options(ctypes.Structure):
    _fields_ = [("model_path", ctypes.c_char_p), ("provider", ctypes.c_char_p), ("threads", ctypes.c_int),
                ("n_ctx", ctypes.c_int), ("system_text", ctypes.c_char_p), ("turn_prefix", ctypes.c_char_p),
                ("turn_suffix", ctypes.c_char_p), ("state_path", ctypes.c_char_p),
                ("state_tokens", ctypes.POINTER(ctypes.c_int32)), ("n_state_tokens", ctypes.c_size_t),
                ("gpu_layers", ctypes.c_int)]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, s, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t
    for name, res, args in (
            ("el_open", p, [ctypes.POINTER(_Options), s, sz]), ("el_begin", i, [p, s, i]),
            ("el_next", i, [p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(sz)]), ("el_reset", None, [p]),
            ("el_close", None, [p]), ("el_error", s, [p]), ("el_info", s, [p]), ("el_state_status", i, [p]),
            ("el_system_tokens", i, [p]), ("el_system_seconds", ctypes.c_double, [p]),
            ("el_prompt_tokens", i, [p]), ("el_n_tokens", i, [p]),
            ("el_answer_tokens", ctypes.POINTER(ctypes.c_int32), [p, ctypes.POINTER(sz)]),
            ("el_tokenize", i, [p, s, i, ctypes.POINTER(ctypes.c_int32), i]),
            ("el_state_data", sz, [p, ctypes.c_void_p, sz])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


@dataclass
class Answer:
    text: str
    tokens: list[int]
    prompt_tokens: int
    ttft_s: float        # el_begin to the first piece (prompt evaluation + one step)
    seconds: float
    ttft_cpu_s: float    # the same in this process's CPU time: the work, whatever else the machine runs
    pieces: list[str] = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / max(self.seconds - self.ttft_s, 1e-9) if len(self.tokens) > 1 else 0.0


class Engine:
    """One el_engine. `library`: a host build from edgellm.package.hostbuild.engine_library."""

    def __init__(self, library: Path, model_path: Path, chat: ChatPieces, *, n_ctx: int = 2048, threads: int = 0,
                 provider: str = "cpu", state_path: Path | None = None, state_tokens: Sequence[int] = ()) -> None:
        self._lib = _bind(ctypes.CDLL(str(library)))
        self._tokens = (ctypes.c_int32 * max(1, len(state_tokens)))(*state_tokens)
        opts = _Options(str(model_path).encode(), provider.encode(), threads, n_ctx, chat.system_text.encode(),
                        chat.turn_prefix.encode(), chat.turn_suffix.encode(),
                        str(state_path).encode() if state_path else None, self._tokens, len(state_tokens), 0)
        err = ctypes.create_string_buffer(512)
        t0, c0 = time.perf_counter(), time.process_time()
        self._e = self._lib.el_open(ctypes.byref(opts), err, len(err))
        self.open_seconds = time.perf_counter() - t0
        self.open_cpu_seconds = time.process_time() - c0  # model load + system prompt (restored or evaluated)
        if not self._e:
            why = err.value.decode(errors="replace")
            if "conversation is full" in why:  # the system prompt alone overflows the context
                raise ContextOverflowError(f"the system prompt does not fit the {n_ctx}-token context "
                                           f"({why.split('(')[-1].split(')')[0]}): shorten it or raise --ctx")
            raise PackagingError(f"the app engine could not open {model_path}: {why}")

    @property
    def info(self) -> str:
        return self._lib.el_info(self._e).decode(errors="replace")

    @property
    def state_status(self) -> int:
        return self._lib.el_state_status(self._e)

    @property
    def system_tokens(self) -> int:
        return self._lib.el_system_tokens(self._e)

    @property
    def system_seconds(self) -> float:
        """What putting the system prompt in the cache took at open (state restore or evaluation)."""
        return self._lib.el_system_seconds(self._e)

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        buf = (ctypes.c_int32 * (len(text.encode()) + 16))()
        n = self._lib.el_tokenize(self._e, text.encode(), int(add_special), buf, len(buf))
        if n < 0:
            raise PackagingError("tokenize failed")
        return list(buf[:n])

    def state(self) -> bytes:
        """The KV state of the conversation so far (llama.cpp: llama_state_seq_get_data)."""
        size = self._lib.el_state_data(self._e, None, 0)
        buf = ctypes.create_string_buffer(size)
        got = self._lib.el_state_data(self._e, buf, size)
        if size == 0 or got != size:
            raise PackagingError("the engine has no state to save (only the llama.cpp engine does)")
        return buf.raw[:got]

    def ask(self, text: str, max_tokens: int = 64) -> Answer:
        t0, c0 = time.perf_counter(), time.process_time()
        if self._lib.el_begin(self._e, text.encode(), max_tokens) != 0:
            raise PackagingError(self._lib.el_error(self._e).decode(errors="replace"))
        piece, size = ctypes.c_void_p(), ctypes.c_size_t()
        pieces, ttft, ttft_cpu = [], 0.0, 0.0
        while True:
            rc = self._lib.el_next(self._e, ctypes.byref(piece), ctypes.byref(size))
            if rc < 0:
                raise PackagingError(self._lib.el_error(self._e).decode(errors="replace"))
            if rc == 0:
                break
            if not pieces:
                ttft, ttft_cpu = time.perf_counter() - t0, time.process_time() - c0
            pieces.append(ctypes.string_at(piece, size.value).decode("utf-8", "replace"))
        n = ctypes.c_size_t()
        ids = self._lib.el_answer_tokens(self._e, ctypes.byref(n))
        tokens = [ids[i] for i in range(n.value)]
        return Answer("".join(pieces), tokens, self._lib.el_prompt_tokens(self._e), ttft,
                      time.perf_counter() - t0, ttft_cpu, pieces)

    def reset(self) -> None:
        self._lib.el_reset(self._e)

    def close(self) -> None:
        if self._e:
            self._lib.el_close(self._e)
            self._e = None

    def __enter__(self) -> Engine:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
