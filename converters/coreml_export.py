"""`edgellm convert --format coreml`: a Checkpoint -> a stateful .mlpackage (iOS 18 / macOS 15) + the files
swift-transformers reads beside it.

Steps: calibrate (int4/int8: the one reference forward pass gives each linear input's Gram matrix) ->
quantize (converters.coreml_quant: GPTQ blocks) -> emit the MIL program (converters.coreml_graph) ->
coremltools converts it to an ML program (palette4: then compresses it with coremltools' k-means) ->
the package is saved to a temporary directory beside the destination and renamed into place; then
config.json, tokenizer.json and tokenizer_config.json are written beside it (each atomically).
edgellm's manifest (source fingerprint, context, quantization, special tokens, chat template) goes into the
model's metadata, where the backends read it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgellm.atomic import atomic_path, write_atomic
from edgellm.errors import ConversionError, UnsupportedModelError, UsageError

from .checkpoint import Checkpoint
from .onnx_export import _stage, calibrate_units, model_facts, write_tokenizer
from .onnx_quant import QuantTensor

QUANTS = ("int4", "int8", "f16", "palette4")
DEFAULT_QUANT = "int4"
DEFAULT_CTX = 2048
ARCHITECTURES = ("llama", "mistral", "qwen2")
# The whole KV state is allocated when a stateful model loads. Above this it no longer fits the memory an
# app gets on the smallest iOS 18 devices (4 GB of RAM; iOS ends apps well before half of it).
STATE_LIMIT = 1 << 30
Progress = Callable[[str, int, int], None]


@dataclass
class CoreMLExport:
    output: str
    quant: str
    ctx: int
    bytes: int                       # the .mlpackage (side files not counted)
    n_params: int
    seconds: float
    op_types: dict[str, int]
    states: dict[str, list[int]]
    imatrix_tokens: int = 0
    rounding: str | None = None      # 'gptq' | 'imatrix' | 'plain' (int4/int8), 'kmeans' (palette4)
    side_files: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    quantized: dict[str, QuantTensor] = field(default_factory=dict, repr=False)   # the blocks written (not in JSON)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "quantized"}
        return {**d, "bits_per_weight": round(8 * self.bytes / max(self.n_params, 1), 3)}


def check_options(ckpt_ctx: int | None, quant: str, ctx: int | None) -> tuple[str, int]:
    quant = (quant or "auto").lower()
    quant = DEFAULT_QUANT if quant == "auto" else quant
    if quant not in QUANTS:
        raise UsageError(f"Core ML takes --quant {', '.join(QUANTS)} or auto, not {quant!r}")
    if ctx is None:
        ctx = min(DEFAULT_CTX, ckpt_ctx or DEFAULT_CTX)
    elif ckpt_ctx and ctx > ckpt_ctx:
        raise UsageError(f"--ctx {ctx} is longer than the model's {ckpt_ctx}-token context")
    if ctx < 16:
        raise UsageError(f"--ctx must be at least 16 tokens, got {ctx}")
    return quant, ctx


def state_bytes(ckpt: Checkpoint, ctx: int) -> int:
    c = ckpt.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * ctx * 2


def export_coreml(ckpt: Checkpoint, dest: str | Path, *, quant: str = DEFAULT_QUANT, ctx: int | None = None,
                  calib_text: str | None = None, calib_tokens: int = 4096, imatrix: bool = True,
                  weights: Callable[[str], np.ndarray] | None = None, calibration=None,
                  source_fingerprint: str | None = None, replace_side_files: bool = False,
                  progress: Progress | None = None) -> CoreMLExport:
    """Write `ckpt` as the Core ML package `dest` (*.mlpackage) with `quant` weights and a `ctx`-token KV state.

    `weights`: a converters.calibrate.weight_getter shared between exports of one checkpoint; `calibration`:
    an onnx_export.calibrate_units result to reuse (its Gram matrices drive GPTQ). `replace_side_files`: allow
    config.json / tokenizer files of another model beside `dest` to be overwritten."""
    from edgellm.runtimes.coreml_package import coremltools

    from .calibrate import weight_getter
    from .coreml_graph import build_program, cache_shape
    from .coreml_quant import coremltools_palette4, quantize_units

    t0 = time.perf_counter()
    dest = Path(dest)
    if dest.suffix != ".mlpackage":
        raise UsageError(f"a Core ML package is a directory named *.mlpackage, not {dest.name!r}")
    c = ckpt.config
    if c.architecture not in ARCHITECTURES:
        raise UnsupportedModelError(f"Core ML export supports {', '.join(ARCHITECTURES)}, not {c.architecture}")
    quant, ctx = check_options(c.max_position_embeddings, quant, ctx)
    if state_bytes(ckpt, ctx) > STATE_LIMIT:
        raise UsageError(f"a {ctx}-token context needs {state_bytes(ckpt, ctx) >> 20} MiB of KV state, more than the "
                         f"{STATE_LIMIT >> 20} MiB an app can hold on the smallest iOS 18 devices: use a smaller --ctx")
    ct = coremltools()
    side = side_files(ckpt, ctx)
    _check_side_files(dest.parent, side, replace_side_files)
    stages: dict[str, float] = {}
    weight = weights or weight_getter(ckpt)
    calib, quantized, rounding = calibration, {}, None
    if quant in ("int4", "int8"):
        t = time.perf_counter()
        if calib is None and imatrix:
            calib = calibrate_units(ckpt, calib_text, calib_tokens, fisher=False, progress=progress)
        stages["calibrate"] = time.perf_counter() - t
        t = time.perf_counter()
        quantized = quantize_units(ckpt, weight, 4 if quant == "int4" else 8,
                                   importance=calib.importance if calib else None, grams=calib.gram if calib else None,
                                   progress=_stage(progress, "quantize"))
        stages["quantize"] = time.perf_counter() - t
        rounding = "gptq" if calib and calib.gram else "imatrix" if calib else "plain"
    t = time.perf_counter()
    prog = build_program(c, weight, ctx, quantized, progress=_stage(progress, "graph"))
    mlmodel = convert_program(ct, prog, ctx)
    if quant == "palette4":
        with _quiet():
            mlmodel, rounding = coremltools_palette4(mlmodel), "kmeans"
    stages["convert"] = time.perf_counter() - t
    facts = {**model_facts(ckpt, "stateful", quant), "format": "edgellm-coreml", "context_length": ctx,
             "rounding": rounding, "source_fingerprint": source_fingerprint,
             "state_shape": list(cache_shape(c, ctx)), "calib_tokens": calib.n_tokens if calib else 0}
    set_metadata(mlmodel, ckpt.name, facts)
    t = time.perf_counter()
    save_package(mlmodel, dest)
    for name, text in side.items():
        write_atomic(dest.parent / name, text.encode("utf-8"))
    stages["save"] = time.perf_counter() - t
    from edgellm.runtimes.coreml_package import io_contract, load_spec, op_histogram, package_bytes

    spec = load_spec(dest)
    states = {n: s["shape"] for n, s in io_contract(spec)["states"].items()}
    return CoreMLExport(str(dest), quant, ctx, package_bytes(dest), ckpt.tensors.n_params(), time.perf_counter() - t0,
                        op_histogram(spec), states, calib.n_tokens if calib else 0, rounding, sorted(side), stages,
                        quantized)


def convert_program(ct, prog, ctx: int):
    """coremltools' ML program from the MIL program, with swift-transformers' flexible query length.

    compute_precision FLOAT32 only means "insert no casts": the program already says which ops are fp16."""
    q = ct.RangeDim(lower_bound=1, upper_bound=ctx, default=1)
    inputs = [ct.TensorType(name="inputIds", shape=(1, q), dtype=np.int32),
              ct.TensorType(name="causalMask", shape=(1, 1, ct.RangeDim(1, ctx, default=1),
                                                      ct.RangeDim(1, ctx, default=1)), dtype=np.float16)]
    with _quiet():
        try:
            return ct.convert(prog, source="milinternal", convert_to="mlprogram", inputs=inputs,
                              outputs=[ct.TensorType(name="logits", dtype=np.float16)],
                              minimum_deployment_target=ct.target.iOS18,
                              compute_precision=ct.precision.FLOAT32, skip_model_load=True)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ConversionError(f"coremltools could not convert the program: {str(e).splitlines()[0]}") from None


def set_metadata(mlmodel, name: str, facts: dict) -> None:
    meta = mlmodel.user_defined_metadata
    from edgellm.runtimes.coreml_package import HF_NAME_KEY, MANIFEST_KEY

    meta[MANIFEST_KEY] = json.dumps(facts, separators=(",", ":"))
    meta[HF_NAME_KEY] = name or "edgellm-model"
    mlmodel.short_description = (f"{name or 'model'}: stateful decoder ({facts['quant']}, {facts['context_length']}-"
                                 "token KV state), written by edgellm")
    mlmodel.input_description["inputIds"] = "token ids (1, q), int32"
    mlmodel.input_description["causalMask"] = "additive mask (1, 1, q, past + q), fp16: 0 = attend, -inf = not"
    mlmodel.output_description["logits"] = "next-token logits (1, q, vocab), fp16"


def save_package(mlmodel, dest: Path) -> None:
    """Save into a temporary directory beside `dest` and rename it into place when complete."""
    try:
        with atomic_path(dest, directory=True) as tmp:
            inner = tmp / "model.mlpackage"       # coremltools insists on the extension
            with _quiet():
                mlmodel.save(str(inner))
            for item in inner.iterdir():
                os.replace(item, tmp / item.name)
            inner.rmdir()
    except OSError as e:
        what = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise ConversionError(f"could not write {dest}: {what}") from None


def side_files(ckpt: Checkpoint, ctx: int) -> dict[str, str]:
    """config.json (HF config with the special token ids) and the tokenizer files, as swift-transformers reads them."""
    cfg = ckpt.config.to_hf_config()
    ids = ckpt.tokenizer.special_ids
    cfg.update({k: ids[k[:-9]] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k[:-9] in ids})
    cfg["edgellm_coreml_context"] = ctx
    out = {"config.json": json.dumps(cfg, indent=2) + "\n"}
    with tempfile.TemporaryDirectory(prefix="edgellm-tok-") as tmp:
        write_tokenizer(ckpt, Path(tmp))
        for p in sorted(Path(tmp).iterdir()):
            out[p.name] = p.read_text(encoding="utf-8")
    return out


def _check_side_files(folder: Path, files: dict[str, str], replace: bool) -> None:
    if replace:
        return
    for name, text in files.items():
        if name == "config.json":   # the context length differs between packages of one model: compare the rest
            continue
        path = folder / name
        if path.is_file() and path.read_text(encoding="utf-8", errors="replace") != text:
            raise UsageError(f"{path} belongs to another model: write the package into its own folder "
                             "(or pass --force to replace the tokenizer files there)")


@contextlib.contextmanager
def _quiet():
    """coremltools prints progress bars and warnings on stdout/stderr; edgellm shows its own progress."""
    import logging
    import warnings

    if os.environ.get("EDGELLM_LOG", "").lower() in ("debug", "verbose", "1"):
        yield
        return
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def source_fingerprint(path: Path) -> str:
    """sha256 over the source's size and 16 samples of 64 KiB per file (HF directory: its weights and config)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}|{size}".encode())
        with open(f, "rb") as fh:
            for off in range(0, size, max(1, size // 16)):
                fh.seek(off)
                h.update(fh.read(65536))
    return h.hexdigest()


def convert_to_coreml(source: str, dest: str | Path, *, quant: str = DEFAULT_QUANT, ctx: int | None = None,
                      calib_text: str | None = None, calib_tokens: int = 4096, imatrix: bool = True,
                      force: bool = False, progress: Progress | None = None) -> CoreMLExport:
    """`source` (store alias, GGUF file or HF directory) -> Core ML package `dest`."""
    from edgellm import store
    from edgellm.runtimes.coreml_package import coremltools

    from .pipeline import read_checkpoint

    check_options(None, quant, ctx)      # bad options fail before the model is read
    coremltools()
    if Path(dest).exists() and not force:
        raise UsageError(f"{dest} exists; pass --force to replace it")
    ref = store.resolve(source)
    ckpt = read_checkpoint(ref.path, ref.kind)
    return export_coreml(ckpt, dest, quant=quant, ctx=ctx, calib_text=calib_text, calib_tokens=calib_tokens,
                         imatrix=imatrix, source_fingerprint=source_fingerprint(ref.path), replace_side_files=force,
                         progress=progress)

