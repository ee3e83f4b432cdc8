"""`edgellm.load`: resolve a model and hand it to the loader for its format (GGUF, ONNX, Core ML).

Each format's loader (runtime_gguf, runtime_onnx, runtime_coreml) probes the device, plans the backend
with edgellm.plan and opens a Session; this module only dispatches and checks the options that belong
to one format.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from . import store
from .errors import UnsupportedModelError, UsageError
from .memplan import KV_BYTES, kv_cache_bytes  # noqa: F401 - re-exported: the planner owns the estimate
from .runtimes.base import SamplerConfig
from .session import Session, open_session  # noqa: F401 - open_session: kept importable from here
from .speculate import SpeculationConfig, speculation_from


def load(model: str | os.PathLike[str] | None = None, *, device: str = "auto", n_ctx: int = 4096,
         threads: int | None = None, kv_type: str = "f16", flash_attn: bool | None = None,
         disk_cache: bool | str | os.PathLike[str] = True, memory_cache_mb: int = 512,
         prompt_state: str | os.PathLike[str] | None = None, sampler: SamplerConfig | None = None,
         check_memory: bool = True, parallel: int = 1, rpc: str | Sequence[str] | None = None,
         optimize: bool = False, backend: str | None = None, quality: str = "balanced",
         speculate: bool | SpeculationConfig | None = None) -> Session:
    """Load a model (store alias, GGUF path, ONNX directory, .mlpackage; default: the embedded
    SmolLM2-135M) for generation and chat.

    device: 'auto' (from the device profile), 'cpu', 'metal'/'gpu', 'nnapi', 'xnnpack', 'ane'. threads:
    default = the device's performance cores (or EDGELLM_THREADS). disk_cache: True (under
    EDGELLM_HOME/kv), a directory, or False. prompt_state: a file from `cache_prompt` whose KV state is
    reused for matching prompts. Refuses (InsufficientMemoryError) before loading a model that
    edgellm.memplan says will not fit. parallel: sequences, each with an n_ctx-token KV cache (edgellm
    serve's slots). rpc: llama.cpp RPC workers ('host:port,...' or a list) that hold the layers
    (edgellm.runtimes.rpc). kv_type, flash_attn, parallel and rpc are llama.cpp options.
    optimize: for a GGUF file, run it the way `edgellm optimize` measured fastest on this device within the
    `quality` bound (measuring first if no decision is stored; the plan's reasons say so). backend: pin
    'llama.cpp' or 'onnx' instead. speculate: prompt-lookup decoding for single-sequence generation (None, the
    default: on for backends whose batched rows equal single steps — onnxruntime — off on llama.cpp, whose
    batch kernels move logits enough to flip a near-tie; True: on, drafting only where the measured cost model
    says it pays; False: off; or a SpeculationConfig); the same sampling distribution (edgellm.speculate,
    docs/runtime.md).
    """
    speculate = speculation_from(speculate)  # a bad value fails before anything loads
    ref = store.resolve(model)
    session_kw = dict(disk_cache=disk_cache, memory_cache_mb=memory_cache_mb, prompt_state=prompt_state,
                      sampler=sampler, speculate=speculate)
    if backend not in (None, "llama.cpp", "onnx"):
        raise UsageError(f"backend must be llama.cpp or onnx, not {backend!r}")
    if ref.kind == "gguf" and backend != "llama.cpp" and (optimize or backend == "onnx"):
        from .optimize import load_optimized

        found = load_optimized(ref.path, quality=quality, pinned=backend, device=device, n_ctx=n_ctx,
                               threads=threads, check_memory=check_memory, session_kw=session_kw,
                               llama_options=dict(parallel=parallel, rpc=rpc, kv_type=kv_type, flash_attn=flash_attn))
        if found is not None:
            return found
    if ref.kind == "gguf":
        from .runtime_gguf import load_gguf

        return load_gguf(ref.path, device=device, n_ctx=n_ctx, threads=threads, kv_type=kv_type,
                         flash_attn=flash_attn, check_memory=check_memory, parallel=parallel, rpc=rpc,
                         session_kw=session_kw)
    _refuse_llama_options(ref.path, ref.kind, parallel=parallel, rpc=rpc, kv_type=kv_type, flash_attn=flash_attn)
    if ref.kind == "onnx":
        from .runtime_onnx import load_onnx

        return load_onnx(ref.path, device=device, n_ctx=n_ctx, threads=threads, check_memory=check_memory,
                         session_kw=session_kw)
    if ref.kind == "coreml":
        from .runtime_coreml import load_coreml

        return load_coreml(ref.path, device=device, n_ctx=n_ctx, threads=threads, check_memory=check_memory,
                           session_kw=session_kw)
    raise UnsupportedModelError(
        f"{ref.path} is a {ref.kind} model; the runtime loads GGUF files, ONNX directories and Core ML "
        f"packages — convert it first (edgellm convert {ref.path} -o model.gguf)")


def _refuse_llama_options(path: Path, kind: str, *, parallel: int, rpc, kv_type: str, flash_attn) -> None:
    """Say so when llama.cpp-only options are given for another format, instead of ignoring them."""
    given = [name for name, on in (("parallel", parallel != 1), ("rpc", bool(rpc)), ("kv_type", kv_type != "f16"),
                                   ("flash_attn", bool(flash_attn))) if on]
    if given:
        runs = {"onnx": "onnxruntime runs as one sequence with the graph's own KV cache",
                "coreml": "Core ML runs as one sequence with the package's own state"}.get(kind, "")
        label = {"onnx": "an ONNX", "coreml": "a Core ML"}.get(kind, f"a {kind}")
        raise UsageError(f"{', '.join(given)}: llama.cpp options; {path} is {label} model"
                         + (f", which {runs}" if runs else ""))


def model_fingerprint(path: Path, info) -> str:
    """A GGUF file's content fingerprint (edgellm.fingerprint.gguf_fingerprint; kept for callers)."""
    from .fingerprint import gguf_fingerprint

    return gguf_fingerprint(path, info.data_offset)
