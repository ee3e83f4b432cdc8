"""`edgellm.load` for GGUF files: validate, plan (CPU SIMD / Metal, threads, memory), llama.cpp backend, Session."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .session import Session, open_session


def load_gguf(path: Path, *, device: str = "auto", n_ctx: int = 4096, threads: int | None = None,
              kv_type: str = "f16", flash_attn: bool | None = None, check_memory: bool = True, parallel: int = 1,
              rpc: str | Sequence[str] | None = None, session_kw: dict | None = None,
              kv_grow: bool = True) -> Session:
    """A Session over llama.cpp for a GGUF file (see edgellm.load for the options). kv_grow=False allocates
    the whole n_ctx-cell KV cache up front on the CPU too (runtimes.llamacpp.LlamaCppBackend._fit)."""
    from .device import probe
    from .errors import InsufficientMemoryError
    from .fingerprint import gguf_fingerprint
    from .gguf_check import validate_gguf
    from .memplan import default_flash_attn, estimate, kv_cache_bytes, live_board, require_fit
    from .plan import Artifact, choose
    from .runtimes.llamacpp import LlamaCppBackend, LlamaOptions
    from .runtimes.rpc import parse_endpoints

    info = validate_gguf(path)
    workers = parse_endpoints(rpc) if rpc else ()
    options = LlamaOptions(n_ctx=n_ctx, threads=1, kv_type=kv_type, flash_attn=flash_attn,  # validates options
                           n_seq=parallel, rpc=workers, kv_grow=kv_grow)
    n_ctx_eff = min(n_ctx, info.hparams().get("context_length") or n_ctx)
    kv = kv_cache_bytes(info, n_ctx_eff, kv_type)
    memory_cache_mb = (session_kw or {}).get("memory_cache_mb", 512)
    est = estimate(info, n_ctx_eff, kv_type, flash_attn=flash_attn if flash_attn is not None else
                   default_flash_attn(kv_type, "metal" if device in ("metal", "gpu") else "cpu"),
                   n_seq=parallel, state_cache_bytes=min(kv, memory_cache_mb << 20))
    if workers:  # the weights and the KV cache live on the workers
        est = replace(est, weights_bytes=0, kv_bytes=0)
    plan = choose(probe(), Artifact("gguf", path.stat().st_size, info.file_type_name),
                  requested_device=device, threads=threads, n_ctx=n_ctx_eff, env=os.environ,
                  kv_bytes=kv, memory_bytes=est.total_bytes)
    if not plan.fits and check_memory:
        try:
            require_fit(est, live_board())
        except InsufficientMemoryError as e:
            raise InsufficientMemoryError(f"{e} (or pass check_memory=False to try anyway)") from None
    if flash_attn is None and plan.device == "cpu" and kv_type in ("f16", "f32", "bf16"):  # quantized V needs FA
        # llama.cpp's CPU flash attention is slow for short batches over a long KV cache (llama-bench,
        # SmolLM2-135M, 2 threads: decode at depth 900 41 vs 82 tok/s; a 25-token turn 3x slower) and
        # only wins on long prompt batches (pp512 +8%). Chat turns and decode are the common case.
        flash_attn = False
    options = replace(options, threads=plan.threads, gpu_layers=plan.gpu_layers, flash_attn=flash_attn)
    fingerprint = hashlib.sha256(
        f"{gguf_fingerprint(path, info.data_offset)}|{llama_version()}|{kv_type}|{flash_attn}|{plan.device}".encode()
    ).hexdigest()
    backend = LlamaCppBackend(path, options, device=plan.device, fingerprint=fingerprint)
    return open_session(backend, path, plan, **(session_kw or {}))


def llama_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)
