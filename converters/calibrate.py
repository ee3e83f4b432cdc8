"""Activation statistics on calibration text, from the one reference forward pass."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from .checkpoint import Checkpoint, ModelConfig
from .heap import retained_heap
from .reference import Dims, ImatrixCollector, embed, head, layer

GRAM_LIMIT = 2 << 30     # float32 Gram matrices beyond this are not collected (400 MB for SmolLM2-135M)


def gram_bytes(config: ModelConfig) -> int:
    """What the Gram matrices of every distinct linear input (input_statistics(gram=True)) take in float32."""
    c = config
    return 4 * (c.num_hidden_layers * (3 * c.hidden_size ** 2 + c.intermediate_size ** 2) + c.hidden_size ** 2)


def dims_of(config: ModelConfig) -> Dims:
    return Dims(n_layer=config.num_hidden_layers, n_embd=config.hidden_size, n_head=config.num_attention_heads,
                n_head_kv=config.num_key_value_heads, head_dim=config.head_dim, eps=config.rms_norm_eps,
                rope_theta=config.rope_theta, tied=config.tie_word_embeddings)


def weight_getter(ckpt: Checkpoint) -> Callable[[str], np.ndarray | None]:
    """float32 weights by HF name, loaded once (the forward pass reads every layer per chunk)."""
    cache: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray | None:
        if name not in ckpt.tensors.shapes:
            return None
        if name not in cache:
            cache[name] = np.ascontiguousarray(ckpt.tensors.load(name), dtype=np.float32)
        return cache[name]

    return get


def compute_imatrix(ckpt: Checkpoint, tokens: Sequence[int], *, chunk: int = 512, threads: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Mean squared input of every linear layer over `tokens`, keyed by GGUF tensor name."""
    return input_statistics(ckpt, tokens, chunk=chunk, threads=threads, progress=progress)[0]


def input_statistics(ckpt: Checkpoint, tokens: Sequence[int], *, chunk: int = 512, threads: int | None = None,
                     gram: bool = False, progress: Callable[[int, int], None] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The importance matrix and, with `gram`, the mean x xᵀ of every distinct linear-layer input
    (keyed by the first GGUF tensor that reads it: attn_q, attn_output, ffn_gate, ffn_down, the head).

    Layer-major: every chunk passes through layer i before layer i+1 loads, so only one layer's
    weights (plus the chunks' hidden states) are in memory, whatever the model's size.
    Chunks run side by side on `threads` Python threads with single-threaded BLAS: numpy releases
    the GIL in its kernels, so the softmax/SiLU/norm arithmetic (a third of the pass, single-threaded
    otherwise) spreads over the cores too, and no BLAS thread pool spins between small matmuls.
    """
    dims = dims_of(ckpt.config)
    starts = list(range(0, max(len(tokens) - 1, 1), chunk))
    collectors = [ImatrixCollector(gram) for _ in starts]   # one per chunk: no shared state between threads
    grams: dict[str, np.ndarray] = {}
    table = weight_getter(ckpt)      # the embedding is read once for every chunk, then dropped
    states = [embed(table, tokens[s:s + chunk]) for s in starts]
    del table
    workers = max(1, min(threads or os.cpu_count() or 1, len(states)))
    with (ThreadPoolExecutor(workers) as pool, threadpool_limits(1 if workers > 1 else None, user_api="blas"),
          retained_heap()):
        for i in range(dims.n_layer):
            get = weight_getter(ckpt)     # a fresh cache per layer: the previous layer's weights are freed
            for name in ckpt.tensors.shapes:
                if name.startswith(f"model.layers.{i}."):
                    get(name)             # loaded here, once, before the threads read them
            states = list(pool.map(lambda hc, i=i, get=get: layer(dims, get, i, *hc), zip(states, collectors)))
            for c in collectors:
                c.take_grams(grams)
            if progress:
                progress(i + 1, dims.n_layer + 1)
        get = weight_getter(ckpt)
        get("model.norm.weight")          # loaded before the threads read it, as above
        list(pool.map(lambda hc: head(dims, get, *hc, logits=False), zip(states, collectors)))
    for c in collectors:
        c.take_grams(grams)
    if progress:
        progress(dims.n_layer + 1, dims.n_layer + 1)
    rows = {name: sum(c.counts.get(name, 0) for c in collectors) for name in grams}
    for name, g in grams.items():
        g /= rows[name]
    return ImatrixCollector.merged(collectors), grams
