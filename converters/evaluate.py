"""Quality of a converted model against a reference: perplexity, KL divergence, top-1 agreement.

Both models run through edgellm's backends (llama.cpp for GGUF, onnxruntime for ONNX directories)
over the same tokens, chunk by chunk; like llama.cpp's perplexity
tool, only the second half of each chunk is scored so every scored token has at least ctx/2
tokens of context. Logits never accumulate: each chunk is reduced to per-token figures at once.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import UsageError


@dataclass(frozen=True)
class EvalResult:
    model: str
    reference: str
    tokens_scored: int
    perplexity: float
    ref_perplexity: float
    mean_kld: float
    p99_kld: float
    top1_agreement: float
    size_bytes: int
    bits_per_weight: float

    def to_dict(self) -> dict:
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, cand: np.ndarray, targets: np.ndarray, rows: int = 64
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-token KLD(ref‖cand), top-1 agreement, and the NLL of `targets` under cand and under ref."""
    kld, agree, nll, ref_nll = [], [], [], []
    for s in range(0, len(ref), rows):
        lp, lq = _log_softmax(ref[s:s + rows]), _log_softmax(cand[s:s + rows])
        kld.append((np.exp(lp) * (lp - lq)).sum(axis=-1))
        agree.append(lp.argmax(axis=-1) == lq.argmax(axis=-1))
        idx = np.arange(len(lq))
        nll.append(-lq[idx, targets[s:s + rows]])
        ref_nll.append(-lp[idx, targets[s:s + rows]])
    return np.concatenate(kld), np.concatenate(agree), np.concatenate(nll), np.concatenate(ref_nll)


def _open(path: str | os.PathLike[str], kw: dict):
    """A session for `path`; a Core ML package off macOS runs in edgellm's MIL interpreter (the saved program)."""
    import sys

    import edgellm
    from edgellm import store

    if store.classify(Path(path)) == "coreml":
        from edgellm.runtime_coreml import load_coreml
        return load_coreml(path, device="auto" if sys.platform == "darwin" else "interpreter", n_ctx=kw["n_ctx"],
                           threads=kw["threads"], session_kw={"disk_cache": False})
    return edgellm.load(path, **kw)


def evaluate(model: str | os.PathLike[str], reference: str | os.PathLike[str], text: str, *, ctx: int = 512,
             threads: int | None = None, max_chunks: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Score `model` against `reference` (GGUF files, ONNX directories or Core ML packages) on `text` (held out
    from calibration)."""
    return evaluate_many([model], reference, text, ctx=ctx, threads=threads, max_chunks=max_chunks,
                         progress=progress)[0]


def evaluate_many(models: Sequence[str | os.PathLike[str]], reference: str | os.PathLike[str], text: str, *,
                  ctx: int = 512, threads: int | None = None, max_chunks: int | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  load_options: Sequence[dict[str, Any]] | None = None) -> list[EvalResult]:
    """evaluate() for several models against one reference, all open at once: the reference runs once per chunk
    for all of them (edgellm optimize scores its candidates so — each one more would cost another reference
    pass). load_options: per model, extra edgellm.load() options (e.g. flash_attn for a GGUF on llama.cpp), so
    a file can be scored against itself run another way."""
    if ctx < 16:
        raise UsageError("--ctx must be at least 16 tokens")
    kw = dict(n_ctx=ctx, threads=threads, disk_cache=False)
    options = list(load_options) if load_options is not None else [{}] * len(models)
    with ExitStack() as stack:
        ref = stack.enter_context(_open(reference, kw))
        cands = [stack.enter_context(_open(m, {**kw, **o})) for m, o in zip(models, options, strict=True)]
        for cand in cands:
            if ref.backend.n_vocab != cand.backend.n_vocab:
                raise UsageError(f"the model's vocabulary ({cand.backend.n_vocab}) differs from the reference's "
                                 f"({ref.backend.n_vocab}): KL divergence needs the same tokenizer")
        tokens = ref.tokenize(text)
        n_chunks = len(tokens) // ctx
        if max_chunks:
            n_chunks = min(n_chunks, max_chunks)
        if n_chunks < 1:
            raise UsageError(f"the evaluation text has {len(tokens)} tokens; at least {ctx} (one chunk) are needed")
        parts: list[list[tuple[np.ndarray, ...]]] = [[] for _ in cands]
        first = ctx // 2
        for c in range(n_chunks):
            chunk = tokens[c * ctx:(c + 1) * ctx]
            targets = np.asarray(chunk[first + 1:])
            ref_logits = _chunk_logits(ref, chunk)[first:-1]
            for part, cand in zip(parts, cands):
                part.append(compare_logits(ref_logits, _chunk_logits(cand, chunk)[first:-1], targets))
            if progress:
                progress(c + 1, n_chunks)
    return [_result(m, reference, part) for m, part in zip(models, parts)]


def _chunk_logits(session: Any, chunk: list[int]) -> np.ndarray:
    session.backend.truncate(0)
    session.tokens.clear()
    return session.backend.eval_all_logits(chunk)


def _result(model: str | os.PathLike[str], reference: str | os.PathLike[str],
            parts: list[tuple[np.ndarray, ...]]) -> EvalResult:
    from edgellm.gguf_check import validate_gguf

    kld, agree, nll, ref_nll = (np.concatenate([p[i] for p in parts]) for i in range(4))
    if Path(model).suffix == ".mlpackage":   # a Core ML package: its program's weights, side files not counted
        from edgellm.runtime_coreml import coreml_facts
        artifact, facts = coreml_facts(Path(model))
        size, n_params = artifact.size_bytes, int(facts.get("n_params") or 0)
    elif Path(model).is_dir():  # an ONNX directory: scored through the same backend protocol
        from edgellm.runtimes.onnx_backend import read_facts
        size = sum(p.stat().st_size for p in Path(model).glob("model.onnx*"))
        n_params = int(read_facts(Path(model)).get("n_params") or 0)
    else:
        size, n_params = Path(model).stat().st_size, validate_gguf(model).n_params
    return EvalResult(
        model=str(model), reference=str(reference), tokens_scored=int(kld.size),
        perplexity=float(np.exp(nll.mean())), ref_perplexity=float(np.exp(ref_nll.mean())),
        mean_kld=float(kld.mean()), p99_kld=float(np.percentile(kld, 99)), top1_agreement=float(agree.mean()),
        size_bytes=size, bits_per_weight=8 * size / max(n_params, 1))
