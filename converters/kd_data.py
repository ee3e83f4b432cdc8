"""Distillation data: training tokens and the teacher's top-k next-token logits, computed once, cached on disk.

The teacher's weights come from its GGUF, dequantized to float32, and run in torch: in float32 its logits
are the reference the student is measured against (llama.cpp's kernels quantize the activations too), and
in batches torch is the faster of the two on a CPU here — 256-token sequences 8 at a time at ~830 tok/s
against llama.cpp's ~230 tok/s for all-position logits, and 128 sampled continuations side by side at
~370 tok/s where llama.cpp's 32 parallel sequences reach ~200 (2 cores, SmolLM2-135M; measured while
building this). llama.cpp only tokenizes.

Training text is a file, or, when none is given, sequence-level KD: the calibration text plus
continuations the teacher samples from prompts cut out of it. The held-out evaluation text is never used
here. Each position keeps the teacher's k largest logits and the log-sum-exp of the full row, so the loss
can also account for the mass outside the top k. Caches live under EDGELLM_HOME/distill, keyed by
(teacher fingerprint, token hash, k, sequence length).
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


@dataclass(frozen=True)
class TextRecipe:
    """How the default training text is made (without a given text): the calibration text `prose_repeats`
    times, then teacher samples at `temperature`, `filtered` as edgellm's sampler draws (top-k 40, top-p 0.95,
    min-p 0.05) or from the teacher's whole distribution. The defaults are the recipe of the best full
    prune + distill run inside 60 minutes (docs/prune-distill.md): prose ×3 and unfiltered T = 1 samples reached a
    held-out KLD of 0.712 (1.99× the teacher's perplexity) where prose ×1 with filtered T = 0.8 samples reached 0.744
    (2.04×) — human text the student sees more often, and samples that carry the teacher's whole distribution."""

    prose_repeats: int = 3
    temperature: float = 1.0
    filtered: bool = False

    def check(self) -> None:
        if self.prose_repeats < 1 or self.temperature <= 0:
            raise UsageError("the text recipe needs prose_repeats ≥ 1 and a positive temperature")


DEFAULT_RECIPE = TextRecipe()


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


def _sample(logits, generator, *, temperature: float, filtered: bool = True, top_k: int = 40, top_p: float = 0.95,
            min_p: float = 0.05):
    """One token per row: filtered as edgellm's sampler does (top-k, then top-p and min-p on what is left), or
    from the whole distribution."""
    import torch

    if not filtered:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    vals, ids = (logits.float() / temperature).topk(top_k, dim=-1)         # sorted, largest first
    probs = torch.softmax(vals, dim=-1)
    keep = (probs.cumsum(-1) - probs < top_p) & (probs >= min_p * probs[:, :1])
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return ids.gather(1, torch.multinomial(probs, 1, generator=generator)).squeeze(1)


def teacher_generations(model, session, prompts: Sequence[str], n_tokens: int, *, seed: int = 0,
                        max_len: int = 192, temperature: float = 0.8, filtered: bool = True, batch: int = 128,
                        progress: Progress | None = None) -> list[int]:
    """About n_tokens of prompt + sampled continuation, each piece ended by the EOS token, cached on disk.

    `batch` pieces are sampled side by side from prompts cut to one length in tokens (no padding); a piece
    ends at the teacher's first end-of-generation token or after max_len tokens.
    """
    import torch

    be = session.backend
    key = _hash("gen-torch", be.fingerprint, "\n".join(prompts), n_tokens, seed, max_len, temperature, batch,
                *(() if filtered else ("unfiltered",)))   # the filtered runs keep their cache
    path = cache_dir() / f"gen-{key}.npz"
    cached = _load_npz(path) if path.exists() else None
    if cached is not None:
        return cached["tokens"].tolist()
    plain = [ids for ids in (session.tokenize(p, special=False) for p in prompts) if len(ids) >= 4]
    if not plain:
        raise UsageError("no prompts to generate distillation text from: give a training text (--text)")
    width = min(len(ids) for ids in plain)
    bos = be.special_token("bos") if be.add_bos() else None
    eos = be.special_token("eos")
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    start = 0
    while len(out) < n_tokens:
        rows = [plain[(start + r) % len(plain)][:width] for r in range(batch)]
        start += batch
        cur = torch.tensor([([bos] if bos is not None else []) + r for r in rows])
        pieces: list[list[int]] = [[] for _ in rows]
        open_rows, past = set(range(batch)), None
        with torch.inference_mode():
            for _ in range(max_len):
                o = model(input_ids=cur, cache=past, use_cache=True, logits_to_keep=1)
                past = o.cache
                tok = _sample(o.logits[:, -1], gen, temperature=temperature, filtered=filtered).tolist()
                for r in list(open_rows):
                    if be.is_eog(tok[r]):
                        open_rows.discard(r)
                    else:
                        pieces[r].append(tok[r])
                if not open_rows:
                    break
                cur = torch.tensor(tok).unsqueeze(1)
        for r, piece in zip(rows, pieces):
            out += r + piece + ([eos] if eos is not None else [])
        if progress:
            progress(min(len(out), n_tokens), n_tokens)
    _save_npz(path, tokens=np.asarray(out, dtype=np.int64))
    return out


def teacher_topk(model, fingerprint: str, tokens: Sequence[int], *, k: int = 32, seq_len: int = 256,
                 batch: int = 8, progress: Progress | None = None) -> KDData:
    """Cut `tokens` into sequences and record the teacher's top-k logits at every position (cached)."""
    import torch

    n_seq = len(tokens) // seq_len
    if len(tokens) < MIN_TRAIN_TOKENS or n_seq < 1:
        raise UsageError(f"the training text has {len(tokens)} tokens; distillation needs at least "
                         f"{max(MIN_TRAIN_TOKENS, seq_len)}")
    n_vocab = int(model.config.vocab_size)
    if not 1 <= k <= n_vocab:
        raise UsageError(f"--top-k must be between 1 and the vocabulary size ({n_vocab})")
    seqs = np.asarray(tokens[:n_seq * seq_len], dtype=np.int64).reshape(n_seq, seq_len)
    key = _hash("topk-torch", fingerprint, seqs, k, seq_len)
    path = cache_dir() / f"topk-{key}.npz"
    cached = _load_npz(path) if path.exists() else None
    if cached is not None and cached["topk_ids"].shape == (n_seq, seq_len, k):
        return KDData(seqs, cached["topk_ids"], cached["topk_logits"], cached["lse"], key)
    ids = np.empty((n_seq, seq_len, k), np.int32)
    vals = np.empty((n_seq, seq_len, k), np.float32)
    lse = np.empty((n_seq, seq_len), np.float32)
    with torch.inference_mode():
        for s in range(0, n_seq, batch):
            logits = model(input_ids=torch.from_numpy(seqs[s:s + batch])).logits.float()
            top = logits.topk(k, dim=-1)
            ids[s:s + batch], vals[s:s + batch] = top.indices.numpy(), top.values.numpy()
            lse[s:s + batch] = torch.logsumexp(logits, dim=-1).numpy()
            if progress:
                progress(min(s + batch, n_seq), n_seq)
    _save_npz(path, topk_ids=ids, topk_logits=vals, lse=lse)
    return KDData(seqs, ids, vals, lse, key)


def build_kd_data(teacher_gguf: Path, text: str | None, *, k: int = 32, seq_len: int = 256,
                  gen_tokens: int = 16384, seed: int = 0, threads: int | None = None,
                  recipe: TextRecipe = DEFAULT_RECIPE,
                  progress: Callable[[str, int, int], None] | None = None) -> tuple[KDData, str]:
    """Training data for distillation and a description of where its text came from."""
    import torch

    import edgellm
    from edgellm.texts import calibration_text

    from .gguf_source import read_gguf
    from .torch_llama import to_torch

    recipe.check()
    stage = (lambda name: (lambda d, t: progress(name, d, t))) if progress else (lambda name: None)
    if threads:
        torch.set_num_threads(threads)
    model = to_torch(read_gguf(teacher_gguf)).eval()
    with edgellm.load(teacher_gguf, n_ctx=512, threads=threads, disk_cache=False) as session:
        if text is not None:
            tokens, source = session.tokenize(text, special=False), "the given text"
        else:
            calib = calibration_text()
            tokens = session.tokenize(calib, special=False) * recipe.prose_repeats
            if gen_tokens > 0:
                tokens = tokens + teacher_generations(model, session, prompts_from(calib), gen_tokens, seed=seed,
                                                      temperature=recipe.temperature, filtered=recipe.filtered,
                                                      progress=stage("generate"))
            times = f" ×{recipe.prose_repeats}" if recipe.prose_repeats > 1 else ""
            how = f"T = {recipe.temperature:g}" + ("" if recipe.filtered else ", unfiltered")
            source = f"calibration text{times} + {gen_tokens} tokens the teacher generated from its prompts ({how})"
        fingerprint = session.backend.fingerprint
    return teacher_topk(model, fingerprint, tokens, k=k, seq_len=seq_len, progress=stage("teacher")), source
