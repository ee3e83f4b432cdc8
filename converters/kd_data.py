"""Distillation data: training tokens and the teacher's top-k next-token logits, computed once, cached on disk.

The teacher runs in llama.cpp on its GGUF (fast on a CPU). Training text is a file, or, when none is
given, sequence-level KD: the calibration text plus continuations the teacher samples from prompts cut
out of it. The held-out evaluation text is never used here. Each position keeps the teacher's k largest
logits and the log-sum-exp of the full row, so the loss can also account for the mass outside the top k.
Caches live under EDGELLM_HOME/distill, keyed by (teacher fingerprint, token hash, k, sequence length).
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm.atomic import write_atomic
from edgellm.errors import UsageError

Progress = Callable[[int, int], None]
MIN_TRAIN_TOKENS = 256


@dataclass
class KDData:
    tokens: np.ndarray       # (n_seq, seq_len) int64 inputs
    topk_ids: np.ndarray     # (n_seq, seq_len, k) int32: the teacher's top-k next tokens after each position
    topk_logits: np.ndarray  # (n_seq, seq_len, k) float32
    lse: np.ndarray          # (n_seq, seq_len) float32: log-sum-exp of the teacher's full logits row
    key: str                 # cache key (identifies teacher + tokens + k)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)


def cache_dir() -> Path:
    from edgellm import store

    return store.home() / "distill"


def teacher_fingerprint(gguf_path: Path) -> str:
    from edgellm.gguf_check import validate_gguf
    from edgellm.runtime import model_fingerprint

    return model_fingerprint(Path(gguf_path), validate_gguf(gguf_path))[:16]


def _hash(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else str(p).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):   # a corrupt or truncated cache is rebuilt, never trusted
        return None


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())


def prompts_from(text: str, n_words: int = 12) -> list[str]:
    """Openings of the text's sentences: what the teacher continues for sequence-level KD."""
    import re

    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= n_words]
    return [" ".join(s.split()[:n_words]) for s in sentences]


def teacher_generations(session, prompts: Sequence[str], n_tokens: int, *, seed: int = 0, max_len: int = 192,
                        temperature: float = 0.8, progress: Progress | None = None) -> list[int]:
    """About n_tokens of prompt + sampled continuation, each piece ended by the EOS token, cached on disk."""
    from edgellm.runtimes.base import SamplerConfig

    key = _hash("gen", session.backend.fingerprint, "\n".join(prompts), n_tokens, seed, max_len, temperature)
    path = cache_dir() / f"gen-{key}.npz"
    cached = _load_npz(path) if path.exists() else None
    if cached is not None:
        return cached["tokens"].tolist()
    if not prompts:
        raise UsageError("no prompts to generate distillation text from: give a training text (--text)")
    eos = session.backend.special_token("eos")
    out: list[int] = []
    i = 0
    while len(out) < n_tokens:
        prompt = prompts[i % len(prompts)]
        sampler = SamplerConfig(temperature=temperature, top_k=40, top_p=0.95, min_p=0.05, seed=seed + i)
        done = session.generate(prompt, max_tokens=max_len, sampler=sampler)
        out += session.tokenize(prompt, special=False) + done.tokens + ([eos] if eos is not None else [])
        i += 1
        if progress:
            progress(min(len(out), n_tokens), n_tokens)
    _save_npz(path, tokens=np.asarray(out, dtype=np.int64))
    return out


def teacher_topk(session, tokens: Sequence[int], *, k: int = 32, seq_len: int = 256,
                 progress: Progress | None = None) -> KDData:
    """Cut `tokens` into sequences and record the teacher's top-k logits at every position (cached)."""
    n_seq = len(tokens) // seq_len
    if len(tokens) < MIN_TRAIN_TOKENS or n_seq < 1:
        raise UsageError(f"the training text has {len(tokens)} tokens; distillation needs at least "
                         f"{max(MIN_TRAIN_TOKENS, seq_len)}")
    if not 1 <= k <= session.backend.n_vocab:
        raise UsageError(f"--top-k must be between 1 and the vocabulary size ({session.backend.n_vocab})")
    seqs = np.asarray(tokens[:n_seq * seq_len], dtype=np.int64).reshape(n_seq, seq_len)
    key = _hash("topk", session.backend.fingerprint, seqs, k, seq_len)
    path = cache_dir() / f"topk-{key}.npz"
    cached = _load_npz(path) if path.exists() else None
    if cached is not None and cached["topk_ids"].shape == (n_seq, seq_len, k):
        return KDData(seqs, cached["topk_ids"], cached["topk_logits"], cached["lse"], key)
    ids = np.empty((n_seq, seq_len, k), np.int32)
    vals = np.empty((n_seq, seq_len, k), np.float32)
    lse = np.empty((n_seq, seq_len), np.float32)
    be = session.backend
    for s in range(n_seq):
        be.truncate(0)
        session.tokens.clear()
        logits = be.eval_all_logits(seqs[s].tolist())
        top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
        ids[s], vals[s] = top, np.take_along_axis(logits, top, axis=-1)
        m = logits.max(axis=-1)
        lse[s] = m + np.log(np.exp(logits - m[:, None]).sum(axis=-1))
        if progress:
            progress(s + 1, n_seq)
    be.truncate(0)
    session.tokens.clear()
    _save_npz(path, topk_ids=ids, topk_logits=vals, lse=lse)
    return KDData(seqs, ids, vals, lse, key)


def build_kd_data(teacher_gguf: Path, text: str | None, *, k: int = 32, seq_len: int = 256,
                  gen_tokens: int = 16384, seed: int = 0, threads: int | None = None,
                  progress: Callable[[str, int, int], None] | None = None) -> tuple[KDData, str]:
    """Training data for distillation and a description of where its text came from."""
    import edgellm
    from edgellm.texts import calibration_text

    stage = (lambda name: (lambda d, t: progress(name, d, t))) if progress else (lambda name: None)
    with edgellm.load(teacher_gguf, n_ctx=max(seq_len, 512), threads=threads, disk_cache=False) as session:
        if text is not None:
            tokens, source = session.tokenize(text, special=False), "the given text"
        else:
            calib = calibration_text()
            tokens = session.tokenize(calib, special=False)
            if gen_tokens > 0:
                tokens = tokens + teacher_generations(session, prompts_from(calib), gen_tokens, seed=seed,
                                                      progress=stage("generate"))
            source = f"calibration text + {gen_tokens} tokens the teacher generated from its prompts"
        return teacher_topk(session, tokens, k=k, seq_len=seq_len, progress=stage("teacher")), source
