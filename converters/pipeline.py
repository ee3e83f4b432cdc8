"""`edgellm convert` end to end: read (HF dir or GGUF) → calibrate → quantize → write, atomically."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgellm.errors import UsageError

from .quantize import QUANT_TYPES, ftype_of, quantize

FLOAT_TYPES = ("F32", "F16", "BF16")
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class ConvertResult:
    source: str
    output: str
    format: str
    quant: str | None
    bytes: int
    n_params: int
    seconds: float
    imatrix_tokens: int = 0
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(self.n_params, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": round(self.bits_per_weight, 3)}


def read_checkpoint(path: Path, kind: str):
    if kind == "hf":
        from .hf_source import read_hf
        return read_hf(path)
    if kind == "gguf":
        from .gguf_source import read_gguf
        return read_gguf(path)
    raise UsageError(f"cannot convert a {kind} model; sources are Hugging Face directories and GGUF files")


def convert(source: str | os.PathLike[str], output: str | os.PathLike[str], *, quant: str = "Q4_K_M",
            to: str = "gguf", calib_text: str | None = None, imatrix: bool = True, calib_tokens: int = 4096,
            threads: int | None = None, progress: Progress | None = None) -> ConvertResult:
    """Convert `source` into `output` (GGUF quantized to `quant`, or a HF directory with to='hf').

    For quantized types the importance matrix is computed from `calib_text` (default: the
    calibration text shipped with edgellm) with the reference forward pass and handed to
    llama.cpp's quantizer. Nothing appears at `output` until it is complete.
    """
    from edgellm import store

    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    if to not in ("gguf", "hf"):
        raise UsageError(f"--to must be gguf or hf, not {to!r}")
    quant = quant.upper()
    if to == "gguf":
        ftype_of(quant)
    out = Path(output)
    ref = store.resolve(source)
    ckpt = read_checkpoint(ref.path, ref.kind)
    n_params = ckpt.tensors.n_params()
    stages["read"] = time.perf_counter() - t0

    def done(fmt: str, q: str | None, n_tok: int = 0) -> ConvertResult:
        size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        return ConvertResult(str(ref.path), str(out), fmt, q, size, n_params, time.perf_counter() - t0, n_tok, stages)

    if to == "hf":
        from .hf_writer import write_hf
        write_hf(ckpt, out, "F32" if quant not in FLOAT_TYPES else quant)
        stages["write"] = time.perf_counter() - t0 - stages["read"]
        return done("hf", None)
    from .gguf_writer import write_gguf
    if quant in FLOAT_TYPES:
        write_gguf(ckpt, out, quant, progress=_stage(progress, "write"))
        return done("gguf", quant)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.work-"))
    try:
        base = ref.path
        if ref.kind != "gguf":  # llama.cpp's quantizer reads GGUF: stage the checkpoint as F32 first
            base = work / "f32.gguf"
            t = time.perf_counter()
            write_gguf(ckpt, base, "F32", progress=_stage(progress, "stage F32"))
            stages["stage_f32"] = time.perf_counter() - t
        im, n_tok = None, 0
        if imatrix:
            t = time.perf_counter()
            im, n_tok = calibration_imatrix(ckpt, base, calib_text, calib_tokens, progress)
            stages["imatrix"] = time.perf_counter() - t
        t = time.perf_counter()
        quantize(base, out, quant, threads=threads, imatrix=im)
        stages["quantize"] = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return done("gguf", quant, n_tok)


def calibration_imatrix(ckpt, gguf_path: Path, text: str | None, max_tokens: int, progress: Progress | None = None):
    """The importance matrix of `ckpt` on calibration text, tokenized by llama.cpp from `gguf_path`."""
    import edgellm

    from edgellm.texts import calibration_text

    from .calibrate import compute_imatrix

    text = text if text is not None else calibration_text()
    with edgellm.load(gguf_path, n_ctx=512, disk_cache=False) as tok:  # llama.cpp's own tokenizer for the file
        tokens = tok.tokenize(text)[:max_tokens]
    if len(tokens) < 64:
        raise UsageError(f"the calibration text has only {len(tokens)} tokens; give at least a few hundred (--calib)")
    return compute_imatrix(ckpt, tokens, progress=_stage(progress, "calibrate")), len(tokens)


def _stage(progress: Progress | None, name: str) -> Callable[[int, int], None] | None:
    return None if progress is None else (lambda d, t: progress(name, d, t))


__all__ = ["ConvertResult", "QUANT_TYPES", "convert"]
