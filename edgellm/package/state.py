"""The shipped system-prompt state of the llama.cpp path.

Computed by edgellm's own engine (native/engine_llama.c) on a host build of the llama.cpp version the
app ships (edgellm.package.hostbuild), with flash attention on and an f16 KV cache, as the app opens
it: llama.cpp refuses a state saved with another version, flash-attention setting, KV type or layer
count. The file is edgellm's EDGEKV01 state format (runtimes/kv_cache.py: magic, JSON header with
sha256 of tokens and payload, token ids, llama_state_seq_get_data bytes); the manifest records its
sha256 and token ids, so the app checks the file and, when llama.cpp refuses it anyway, evaluates
those tokens instead.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import ContextOverflowError, PackagingError
from ..runtimes.kv_cache import write_state_file
from . import hostbuild, natives
from .engine import Engine
from .manifest import ChatPieces

Progress = Callable[[str, int, int], None]


def fingerprint(model_sha256: str) -> str:
    return (f"llama.cpp b{natives.LLAMA_CPP_BUILD}-{natives.LLAMA_CPP_COMMIT}|model {model_sha256}"
            "|flash_attn on|kv f16|seq 0")


def shipped_state(gguf: Path, chat: ChatPieces, dest: Path, *, n_ctx: int, threads: int = 0,
                  progress: Progress | None = None) -> dict:
    """Evaluate chat.system_text and write its state to `dest`; returns the manifest's system_state."""
    lib = hostbuild.engine_library("llama", progress=progress)
    if progress:
        progress("system state", 0, 1)
    with Engine(lib, gguf, chat, n_ctx=n_ctx, threads=threads) as engine:
        tokens = engine.tokenize(chat.system_text, add_special=True)
        if len(tokens) != engine.system_tokens:
            raise PackagingError(f"the engine evaluated {engine.system_tokens} system tokens but tokenizes "
                                 f"{len(tokens)}: refusing to ship an inconsistent state")
        if len(tokens) + 8 > n_ctx:
            raise ContextOverflowError(f"the system prompt takes {len(tokens)} tokens; the context is {n_ctx}: "
                                       "shorten it or raise --ctx")
        payload = engine.state()
    model_sha = natives.sha256_file(gguf)
    write_state_file(dest, fingerprint(model_sha), tokens, payload)
    if progress:
        progress("system state", 1, 1)
    return {"file": dest.name, "format": "EDGEKV01", "sha256": natives.sha256_file(dest),
            "bytes": dest.stat().st_size, "n_tokens": len(tokens), "tokens": tokens,
            "llama_cpp": f"b{natives.LLAMA_CPP_BUILD}-{natives.LLAMA_CPP_COMMIT}", "flash_attn": True,
            "type_k": "f16", "type_v": "f16", "model_sha256": model_sha}
