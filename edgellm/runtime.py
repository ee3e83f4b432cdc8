"""`edgellm.load`: resolve a model, probe the device, choose a backend, and open a Session."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from . import store
from .errors import UnsupportedModelError, UsageError
from .gguf_check import GGUFInfo, validate_gguf
from .memplan import KV_BYTES, kv_cache_bytes  # noqa: F401 - re-exported: the planner owns the estimate
from .runtimes.base import SamplerConfig
from .runtimes.kv_cache import DiskCache, PrefixCache
from .session import Session


def model_fingerprint(path: Path, info: GGUFInfo) -> str:
    """Identify the model's content cheaply: header + tensor table + samples of the tensor data."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(info.data_offset))
        step = max(1, (size - info.data_offset) // 16)
        for off in range(info.data_offset, size, step):
            f.seek(off)
            h.update(f.read(65536))
    return h.hexdigest()


def load(model: str | os.PathLike[str] | None = None, *, device: str = "auto", n_ctx: int = 4096,
         threads: int | None = None, kv_type: str = "f16", flash_attn: bool | None = None,
         disk_cache: bool | str | os.PathLike[str] = True, memory_cache_mb: int = 512,
         prompt_state: str | os.PathLike[str] | None = None, sampler: SamplerConfig | None = None,
         check_memory: bool = True, parallel: int = 1, rpc: str | Sequence[str] | None = None) -> Session:
    """Load a model (store alias, GGUF path; default: the embedded SmolLM2-135M) for generation and chat.

    device: 'auto' (from the device profile), 'cpu', 'metal'/'gpu'. threads: default = the device's
    performance cores (or EDGELLM_THREADS). disk_cache: True (under EDGELLM_HOME/kv), a directory, or
    False. prompt_state: a file from `cache_prompt` whose KV state is reused for matching prompts.
    Refuses (InsufficientMemoryError) before loading a model that edgellm.memplan says will not fit.
    parallel: sequences, each with an n_ctx-token KV cache (edgellm serve's slots). rpc: llama.cpp RPC
    workers ('host:port,...' or a list) that hold the layers (see edgellm.rpc).
    """
    from .device import probe
    from .errors import InsufficientMemoryError
    from .memplan import default_flash_attn, estimate, live_board, require_fit
    from .plan import Artifact, choose
    from .rpc import parse_endpoints
    from .runtimes.llamacpp import LlamaCppBackend, LlamaOptions

    ref = store.resolve(model)
    if ref.kind == "onnx":
        llama_only = [name for name, given in (("parallel", parallel != 1), ("rpc", bool(rpc)),
                                               ("kv_type", kv_type != "f16"), ("flash_attn", bool(flash_attn)))
                      if given]
        if llama_only:   # onnxruntime runs one sequence with an f32 cache in its own graph: say so, don't ignore
            raise UsageError(f"{', '.join(llama_only)}: llama.cpp options; {ref.path} is an ONNX model, which "
                             "onnxruntime runs as one sequence with the graph's own KV cache")
        from .runtime_onnx import load_onnx
        return load_onnx(ref.path, device=device, n_ctx=n_ctx, threads=threads, check_memory=check_memory,
                         session_kw=dict(disk_cache=disk_cache, memory_cache_mb=memory_cache_mb,
                                         prompt_state=prompt_state, sampler=sampler))
    if ref.kind != "gguf":
        raise UnsupportedModelError(
            f"{ref.path} is a {ref.kind} model; the runtime loads GGUF files — convert it first "
            f"(edgellm convert {ref.path} -o model.gguf)")
    info = validate_gguf(ref.path)
    workers = parse_endpoints(rpc) if rpc else ()
    options = LlamaOptions(n_ctx=n_ctx, threads=1, kv_type=kv_type, flash_attn=flash_attn,  # validates options
                           n_seq=parallel, rpc=workers)
    n_ctx_eff = min(n_ctx, info.hparams().get("context_length") or n_ctx)
    kv = kv_cache_bytes(info, n_ctx_eff, kv_type)
    est = estimate(info, n_ctx_eff, kv_type, flash_attn=flash_attn if flash_attn is not None else
                   default_flash_attn(kv_type, "metal" if device in ("metal", "gpu") else "cpu"),
                   n_seq=parallel, state_cache_bytes=min(kv, memory_cache_mb << 20))
    if workers:  # the weights and the KV cache live on the workers
        est = replace(est, weights_bytes=0, kv_bytes=0)
    plan = choose(probe(), Artifact("gguf", ref.path.stat().st_size, info.file_type_name),
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
        f"{model_fingerprint(ref.path, info)}|{_llama_version()}|{kv_type}|{flash_attn}|{plan.device}".encode()
    ).hexdigest()
    backend = LlamaCppBackend(ref.path, options, device=plan.device, fingerprint=fingerprint)
    return open_session(backend, ref.path, plan, disk_cache=disk_cache, memory_cache_mb=memory_cache_mb,
                        prompt_state=prompt_state, sampler=sampler)


def open_session(backend, path: Path, plan, *, disk_cache: bool | str | os.PathLike[str] = True,
                 memory_cache_mb: int = 512, prompt_state: str | os.PathLike[str] | None = None,
                 sampler: SamplerConfig | None = None) -> Session:
    """A Session over any backend, with the in-memory and disk KV caches and an optional shipped state."""
    disk = None
    if disk_cache:
        root = store.home() / "kv" if disk_cache is True else Path(disk_cache)
        disk = DiskCache(root, backend.fingerprint)
    session = Session(backend, path, plan=plan, template=backend.metadata("tokenizer.chat_template"),
                      memory_cache=PrefixCache(memory_cache_mb << 20), disk_cache=disk,
                      default_sampler=sampler or SamplerConfig())
    if prompt_state is not None:
        session.import_state(prompt_state)
    return session


def _llama_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


