"""`edgellm convert` end to end: read (HF dir or GGUF) → calibrate → quantize → write, atomically."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgellm.atomic import sweep_stale, temp_prefix
from edgellm.errors import UsageError

from .calibrate import GRAM_LIMIT, compute_imatrix, gram_bytes, input_statistics
from .evaluate import evaluate
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
    recipe: dict[str, int] | None = None        # type -> tensor count, for --target-size
    gptq: dict | None = None                   # what GPTQ rounding did (gguf_gptq.GptqReport.to_dict())
    evaluation: dict | None = None             # EvalResult.to_dict() against the source, for --eval
    fallbacks: dict[str, int] = field(default_factory=dict)   # types used where a K-quant did not fit the rows

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


def write_checkpoint(ckpt, output: Path, to: str = "gguf", out_type: str = "F16",
                     progress: Callable[[str, int, int], None] | None = None) -> None:
    """Write an (unquantized) checkpoint as a GGUF file or a Hugging Face directory, atomically."""
    if to == "hf":
        from .hf_writer import write_hf
        write_hf(ckpt, output, out_type)
    else:
        from .gguf_writer import write_gguf
        write_gguf(ckpt, output, out_type,
                   progress=None if progress is None else (lambda d, t: progress("write", d, t)))


def convert(source: str | os.PathLike[str], output: str | os.PathLike[str], *, quant: str = "Q4_K_M",
            to: str = "gguf", calib_text: str | None = None, imatrix: bool = True, calib_tokens: int = 2048,
            threads: int | None = None, progress: Progress | None = None, target_size: int | None = None,
            target_bpw: float | None = None, recipe: str | os.PathLike[str] | None = None,
            sensitivity_tokens: int = 1024, eval_text: str | None = None,
            transform: Callable | None = None, gptq: bool | None = None) -> ConvertResult:
    """Convert `source` into `output` (GGUF quantized to `quant`, or a HF directory with to='hf').

    For quantized types the importance matrix is computed from `calib_text` (default: the
    calibration text shipped with edgellm) with the reference forward pass and handed to
    llama.cpp's quantizer. Nothing appears at `output` until it is complete.

    `target_size` (bytes) or `target_bpw` (or quant='auto' with one of them) picks a type per tensor
    under that budget (converters/mixed.py) and saves the recipe beside the output; `recipe` reapplies
    a saved one. `eval_text` scores the result against its source (mean KLD, PPL) before the staging
    files go. `transform` (checkpoint -> checkpoint) runs right after reading: pruning and distillation.

    `gptq`: also round with GPTQ (converters/gguf_gptq.py) from the calibration Gram matrices — per tensor,
    the blocks with the lower measured output error are kept, llama.cpp's or GPTQ's; with a size target the
    GPTQ variants are options of their own. Default (None): on for target_size/target_bpw/recipe, off for a
    plain preset (whose conversion time stays that of llama.cpp's route; GPTQ's cost is its own stage).
    """
    from edgellm import store

    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    if to not in ("gguf", "hf"):
        raise UsageError(f"--to must be gguf or hf, not {to!r}")
    quant = quant.upper()
    mixed = bool(target_size or target_bpw or recipe)
    if quant == "AUTO" and not mixed:
        raise UsageError("--quant auto chooses types per tensor for a budget: give --target-size or --target-bpw")
    if mixed and (to != "gguf" or not imatrix or quant not in ("AUTO", "Q4_K_M")):
        raise UsageError("--target-size/--target-bpw/--recipe make a GGUF with an importance matrix and choose "
                         "the types themselves: drop --quant, --to hf and --no-imatrix")
    if sum(x is not None for x in (target_size, target_bpw, recipe)) > 1:
        raise UsageError("give one of --target-size, --target-bpw and --recipe")
    if gptq and (to != "gguf" or quant in FLOAT_TYPES or not imatrix):
        raise UsageError("--gptq rounds quantized GGUF blocks from calibration statistics: it needs a quantized "
                         "--quant (or a size target), --to gguf, and no --no-imatrix")
    use_gptq = mixed if gptq is None else gptq
    quant = "AUTO" if mixed else quant
    if to == "gguf" and not mixed:
        ftype_of(quant)
    out = Path(output)
    ref = store.resolve(source)
    ckpt = read_checkpoint(ref.path, ref.kind)
    n_params = ckpt.tensors.n_params()
    stages["read"] = time.perf_counter() - t0
    if transform is not None:  # prune/distill (converters/prune.py, distill.py): new weights, staged below
        t = time.perf_counter()
        ckpt = transform(ckpt)
        n_params = ckpt.tensors.n_params()
        stages["prune_distill"] = time.perf_counter() - t
    if target_bpw is not None:
        if not 1.0 <= target_bpw <= 32.0:
            raise UsageError(f"--target-bpw must be between 1 and 32 bits per weight, not {target_bpw}")
        target_size = int(target_bpw * n_params / 8)
    check_disk(out, n_params, quant if to == "gguf" else "F32", staged=to == "gguf" and quant not in FLOAT_TYPES
               and (ref.kind != "gguf" or transform is not None))

    def done(fmt: str, q: str | None, n_tok: int = 0, **extra) -> ConvertResult:
        size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        return ConvertResult(str(ref.path), str(out), fmt, q, size, n_params, time.perf_counter() - t0, n_tok,
                             stages, **extra)

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
    sweep_stale(out, "work")
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out, "work")))
    try:
        base = ref.path
        if ref.kind != "gguf" or transform is not None:  # the quantizer reads GGUF: stage the weights first
            kind = staging_type(ckpt, exact_reference=eval_text is not None)
            base = work / f"{kind.lower()}.gguf"
            t = time.perf_counter()
            write_gguf(ckpt, base, kind, progress=_stage(progress, f"stage {kind}"))
            stages["stage"] = time.perf_counter() - t
        im, tokens, rec, grams, report = None, [], None, {}, None
        if imatrix:
            t = time.perf_counter()
            tokens = calibration_tokens(base, calib_text, calib_tokens)
            with_gram = use_gptq and gram_bytes(ckpt.config) <= GRAM_LIMIT
            im, grams = input_statistics(ckpt, tokens, threads=threads, gram=with_gram,
                                         progress=_stage(progress, "calibrate"))
            stages["imatrix"] = time.perf_counter() - t
        if mixed:
            t = time.perf_counter()
            rec = size_recipe(ckpt, base, im, tokens[:sensitivity_tokens], target_size, recipe, work, threads,
                              progress, grams=grams)
            stages["recipe"] = time.perf_counter() - t
        t = time.perf_counter()
        qr, report = write_quantized(ckpt, base, out, rec.label if rec else quant, work, imatrix=im,
                                     overrides=rec.types if rec else None, grams=grams if use_gptq else None,
                                     only=set(rec.gptq) if rec else None, threads=threads, progress=progress)
        stages["quantize"] = time.perf_counter() - t - (report.seconds if report else 0.0)
        if report is not None:
            stages["gptq"] = report.seconds
        if rec is not None:
            from .mixed import recipe_path
            rec.save(recipe_path(out))
        scores = None
        if eval_text is not None:
            t = time.perf_counter()
            ctx = min(512, ckpt.config.max_position_embeddings)
            scores = evaluate(out, base, eval_text, ctx=ctx, threads=threads, max_chunks=8).to_dict()
            stages["eval"] = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return done("gguf", "mixed" if rec else quant, len(tokens), recipe=rec and rec.histogram(), evaluation=scores,
                fallbacks=qr.fallbacks, gptq=report and report.to_dict())


def write_quantized(ckpt, base: Path, out: Path, quant: str, work: Path, *, imatrix=None, overrides=None,
                    grams=None, only: set[str] | None = None, threads: int | None = None,
                    progress: Progress | None = None):
    """llama.cpp's quantizer writes `base` as `quant` (with per-tensor `overrides`); with `grams`, GPTQ then
    rounds the tensors it can (only those in `only`, unconditionally, when a recipe chose them; else each
    where its output error is lower) and patches them in. `out` appears atomically. Returns the quantizer's
    result and the GPTQ report (None without grams)."""
    from edgellm.atomic import atomic_path
    from edgellm.gguf_check import validate_gguf

    if not grams:
        return quantize(base, out, quant, threads=threads, imatrix=imatrix, overrides=overrides), None
    from .gguf_gptq import improve_file

    staged = work / "quantized.gguf"
    qr = quantize(base, staged, quant, threads=threads, imatrix=imatrix, overrides=overrides)
    report = improve_file(staged, ckpt, grams, force=only is not None, only=only, threads=threads,
                          progress=_stage(progress, "gptq"))
    validate_gguf(staged)
    with atomic_path(out) as tmp:
        os.replace(staged, tmp)
    return dataclasses.replace(qr, path=Path(out)), report


def staging_type(ckpt, exact_reference: bool = False) -> str:
    """GGUF type the quantizer's input is staged in: the source's own BF16/F16 bits where every matrix
    has them (lossless, half of F32's bytes; llama.cpp widens them exactly before quantizing), else F32.

    F32 when the staged file is also the reference that --eval scores against: llama.cpp computes
    with 16-bit weights differently (activations rounded too), which would shift the reference logits.
    """
    return "F32" if exact_reference else ckpt.tensors.stored_16bit() or "F32"


def size_recipe(ckpt, base: Path, imatrix, tokens: list[int], target_size: int | None, recipe, work: Path,
                threads: int | None, progress: Progress | None, grams=None):
    """The per-tensor types for `target_size` (measured here), or a saved recipe checked against the model."""
    from .mixed import Recipe, check_recipe, measure_options, plan
    from .sensitivity import fisher_diagonals

    if recipe is not None:
        rec = Recipe.load(recipe)
        check_recipe(rec, ckpt)
        return rec
    fisher, n = fisher_diagonals(ckpt, tokens, threads=threads, progress=_stage(progress, "sensitivity"))
    options, overhead = measure_options(ckpt, base, fisher, n, imatrix, work, threads=threads, progress=progress,
                                        grams=grams or None)
    return plan(options, overhead, target_size, n)


_BYTES_PER_PARAM = {"F32": 4.0, "F16": 2.0, "BF16": 2.0}   # quantized types: ≤ 1.07 (Q8_0) + metadata


def check_disk(out: Path, n_params: int, quant: str, staged: bool) -> None:
    """Refuse before any work when the output (and an F32 staging copy) cannot fit on its disk."""
    need = int(n_params * (_BYTES_PER_PARAM.get(quant, 1.1) + (4.0 if staged else 0.0)))
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(parent).free
    if free < need:
        from edgellm.errors import ConversionError
        from edgellm.sizes import human_bytes
        raise ConversionError(f"not enough disk space at {parent}: this conversion needs about {human_bytes(need)}, "
                              f"{human_bytes(free)} is free")


def calibration_tokens(gguf_path: Path, text: str | None, max_tokens: int) -> list[int]:
    """Calibration text (default: the shipped one) tokenized by llama.cpp's own tokenizer for the file."""
    from edgellm.gguf_check import validate_gguf
    from edgellm.runtimes.llama_tokenize import tokenize_file
    from edgellm.texts import calibration_text

    text = text if text is not None else calibration_text()
    validate_gguf(gguf_path)     # llama.cpp opens only checked files
    tokens = tokenize_file(gguf_path, text)[:max_tokens]
    if len(tokens) < 64:
        raise UsageError(f"the calibration text has only {len(tokens)} tokens; give at least a few hundred (--calib)")
    return tokens


def calibration_imatrix(ckpt, gguf_path: Path, text: str | None, max_tokens: int, progress: Progress | None = None):
    """The importance matrix of `ckpt` on calibration text, and the number of tokens it saw."""
    tokens = calibration_tokens(gguf_path, text, max_tokens)
    return compute_imatrix(ckpt, tokens, progress=_stage(progress, "calibrate")), len(tokens)


def _stage(progress: Progress | None, name: str) -> Callable[[int, int], None] | None:
    return None if progress is None else (lambda d, t: progress(name, d, t))


__all__ = ["ConvertResult", "QUANT_TYPES", "convert"]
