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


def measure_ttft(gguf: Path, chat: ChatPieces, state_path: Path, state_tokens: list[int], question: str, *,
                 n_ctx: int = 2048, threads: int = 1, runs: int = 3, max_tokens: int = 32) -> dict:
    """Time to the first answer token after the model is loaded, cold (the system prompt evaluated) and
    with the shipped state restored, on the app's engine. Wall time, and CPU time of this process (the
    work itself: a busy machine stretches wall time, not CPU time; one thread keeps spin-waits out).
    Model loading is the same in both and is not counted: the CPU it takes is measured by opening the
    model with no system prompt and subtracted."""
    import statistics

    from .engine import STATE_RESTORED

    lib = hostbuild.engine_library("llama")
    bare = ChatPieces(chat.system, "", chat.turn_prefix, chat.turn_suffix)
    wall: dict[str, list[float]] = {"cold": [], "state": []}
    cpu: dict[str, list[float]] = {"cold": [], "state": []}
    answers: dict[str, list[int]] = {}
    restored = True
    for _ in range(runs):
        with Engine(lib, gguf, bare, n_ctx=n_ctx, threads=threads) as e:
            load_cpu = e.open_cpu_seconds
        for label, kw in (("cold", {}), ("state", {"state_path": state_path, "state_tokens": state_tokens})):
            with Engine(lib, gguf, chat, n_ctx=n_ctx, threads=threads, **kw) as e:
                if label == "state":
                    restored = restored and e.state_status == STATE_RESTORED
                a = e.ask(question, max_tokens)
                wall[label].append(e.system_seconds + a.ttft_s)
                cpu[label].append(max(e.open_cpu_seconds - load_cpu, 0.0) + a.ttft_cpu_s)
                answers[label] = a.tokens
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"ttft_cold_ms": round(med["cold"] * 1000, 1), "ttft_state_ms": round(med["state"] * 1000, 1),
            "ttft_cold_cpu_ms": round(med_cpu["cold"] * 1000, 1),
            "ttft_state_cpu_ms": round(med_cpu["state"] * 1000, 1),
            "state_over_cold_wall": round(med["state"] / med["cold"], 3),
            "state_over_cold_cpu": round(med_cpu["state"] / med_cpu["cold"], 3),
            "same_answer": answers["cold"] == answers["state"], "restored": restored, "runs": runs,
            "threads": threads, "system_tokens": len(state_tokens)}
