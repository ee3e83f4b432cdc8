"""Creating a llama.cpp context from LlamaOptions: one place for the parameters, used at load and on growth."""
from __future__ import annotations

from typing import Any

from edgellm.errors import BackendError

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "bf16": 30}


def create_context(ll: Any, model: Any, options: Any, cells: int) -> tuple[Any, int]:
    """A context with `cells` KV cells per sequence for options.n_seq sequences, and its batch size.

    options is a runtimes.llamacpp.LlamaOptions; BackendError (one line) when llama.cpp refuses, usually
    for want of memory.
    """
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = cells * options.n_seq
    cparams.n_batch = min(options.n_batch, cparams.n_ctx)
    cparams.n_ubatch = min(options.n_ubatch, cparams.n_batch)
    cparams.n_threads = options.threads
    cparams.n_threads_batch = options.threads_batch or options.threads
    cparams.no_perf = True
    cparams.n_seq_max = options.n_seq
    # A stream per sequence rather than one shared pool: a sequence's cells then sit exactly where
    # they would in a context of its own, so its attention sums round the same way (greedy outputs
    # equal a single-client run); a shared pool scatters them among other sequences' cells.
    cparams.kv_unified = False
    cparams.type_k = cparams.type_v = KV_TYPES[options.kv_type]
    cparams.flash_attn_type = {None: ll.LLAMA_FLASH_ATTN_TYPE_AUTO, True: ll.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                               False: ll.LLAMA_FLASH_ATTN_TYPE_DISABLED}[options.flash_attn]
    ctx = ll.llama_init_from_model(model, cparams)
    if not ctx:
        raise BackendError(
            f"llama.cpp could not create a context of {cparams.n_ctx} tokens "
            f"(KV type {options.kv_type}{', flash attention' if options.flash_attn else ''}); "
            "try a smaller --ctx or another --kv-type")
    return ctx, cparams.n_batch
