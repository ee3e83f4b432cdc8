"""Quantization through llama.cpp's own quantizer (llama_model_quantize), written atomically.

llama.cpp already implements every block format and its per-tensor type rules; edgellm only
drives it, validates the input first, and makes the output appear at its destination only when
it is complete.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import gguf

from edgellm.atomic import atomic_path
from edgellm.errors import ConversionError, UsageError

# The types edgellm offers; names as llama.cpp's quantize tool spells them.
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S",
               "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q2_K")


def ftype_of(name: str) -> int:
    key = name.upper()
    if key not in QUANT_TYPES:
        raise UsageError(f"unknown quantization type {name!r}; choose from {', '.join(QUANT_TYPES)}")
    return int(gguf.LlamaFileType.ALL_F32 if key == "F32" else gguf.LlamaFileType[f"MOSTLY_{key}"])


@dataclass(frozen=True)
class QuantResult:
    path: Path
    quant: str
    bytes: int
    n_params: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(self.n_params, 1)


def quantize(src: Path, dest: Path, quant: str, *, threads: int | None = None) -> QuantResult:
    """Write `src` (a validated GGUF) quantized to `quant` at `dest`; nothing appears at `dest` on failure."""
    import llama_cpp

    from edgellm.gguf_check import validate_gguf
    from edgellm.runtimes.llamacpp import init_native_logging

    ftype = ftype_of(quant)
    validate_gguf(src)
    init_native_logging()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = True  # a quantized source is dequantized tensor by tensor, then requantized
    t0 = time.perf_counter()
    with atomic_path(Path(dest)) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ConversionError(f"llama.cpp's quantizer failed on {src} → {quant} (code {rc}); "
                                  "run with --verbose to see its log")
        info = validate_gguf(tmp)
    size = Path(dest).stat().st_size
    return QuantResult(Path(dest), quant.upper(), size, info.n_params, time.perf_counter() - t0)
