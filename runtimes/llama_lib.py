"""Loading llama-cpp-python's native library once, with llama.cpp's own log silenced unless asked for.

Shared by the llama.cpp backend and the RPC code (both drive the same libllama/libggml copies).
"""
from __future__ import annotations

import ctypes
import os

from edgellm.errors import BackendError

_log_callback = None  # keep the ctypes callback alive for the process lifetime


def llama():
    """The llama_cpp module (ctypes bindings), or a BackendError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the install
        raise BackendError(f"llama-cpp-python is not installed or failed to load: {e}") from None
    return llama_cpp


def init_native_logging(verbose: bool | None = None) -> None:
    """Silence llama.cpp's own logging unless --verbose / EDGELLM_LOG=debug."""
    global _log_callback
    llama_cpp = llama()
    if verbose is None:
        verbose = os.environ.get("EDGELLM_LOG", "").lower() in ("debug", "verbose", "1")
    if _log_callback is None:
        llama_cpp.llama_backend_init()

    @llama_cpp.llama_log_callback
    def _cb(level, text, user_data):  # noqa: ARG001 - ctypes signature
        if verbose and text:
            os.write(2, text)

    _log_callback = _cb
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
