"""Quantization through llama.cpp's own quantizer (llama_model_quantize), written atomically.

llama.cpp already implements every block format and its per-tensor type rules; edgellm only
drives it, validates the input first, and makes the output appear at its destination only when
it is complete.
"""
from __future__ import annotations

import ctypes
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from edgellm.atomic import atomic_path
from edgellm.errors import ConversionError, UsageError

# The types edgellm offers; names as llama.cpp's quantize tool spells them.
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S",
               "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q3_K_S", "Q2_K")


def ftype_of(name: str) -> int:
    key = name.upper()
    if key not in QUANT_TYPES:
        raise UsageError(f"unknown quantization type {name!r}; choose from {', '.join(QUANT_TYPES)}")
    return int(gguf.LlamaFileType.ALL_F32 if key == "F32" else gguf.LlamaFileType[f"MOSTLY_{key}"])


# presets built on 256-wide super-blocks: a tensor whose rows are not a multiple of 256 cannot use them
SUPER_BLOCK_TYPES = ("Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_M", "Q3_K_S", "Q2_K")


@dataclass(frozen=True)
class QuantResult:
    path: Path
    quant: str
    bytes: int
    n_params: int
    seconds: float
    fallbacks: dict[str, int] = field(default_factory=dict)   # type llama.cpp used instead -> tensor count

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(self.n_params, 1)


def _imatrix_array(imatrix: Mapping[str, np.ndarray], keep: list) -> object:
    """A NULL-terminated llama_model_imatrix_data[] (the arrays are kept alive in `keep`)."""
    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(imatrix.items()):
        arr = np.ascontiguousarray(values, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ConversionError(f"importance matrix for {name} has non-finite values")
        keep.append(arr)
        entries[i].name = name.encode()
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    keep.append(entries)
    return entries


def _overrides_array(overrides: Mapping[str, str], keep: list) -> object:
    """A NULL-terminated llama_model_tensor_override[]: exact tensor name → ggml type."""
    import llama_cpp

    entries = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (name, type_name) in enumerate(overrides.items()):
        try:
            ggml_type = int(gguf.GGMLQuantizationType[type_name.upper()])
        except KeyError:
            raise UsageError(f"unknown tensor type {type_name!r} for {name}") from None
        entries[i].pattern = f"^{re.escape(name)}$".encode()
        entries[i].type = ggml_type
    keep.append(entries)
    return entries


def quantize(src: Path, dest: Path, quant: str, *, threads: int | None = None,
             imatrix: Mapping[str, np.ndarray] | None = None,
             overrides: Mapping[str, str] | None = None, pure: bool = False) -> QuantResult:
    """Write `src` (a validated GGUF) quantized to `quant` at `dest`; nothing appears at `dest` on failure.

    `imatrix`: per-tensor mean squared input activations (GGUF tensor names), which llama.cpp's
    quantizer uses as per-column weights. `overrides`: exact tensor name → type, for mixed precision.
    `pure`: every 2-D tensor gets the type itself (no per-tensor preset rules; shape fallbacks still apply).
    """
    import llama_cpp

    from edgellm.gguf_check import validate_gguf
    from edgellm.runtimes.llamacpp import init_native_logging

    ftype = ftype_of(quant)
    validate_gguf(src)
    init_native_logging()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    params.pure = pure
    params.allow_requantize = True  # a quantized source is dequantized tensor by tensor, then requantized
    keep: list = []
    if imatrix:
        params.imatrix = ctypes.cast(_imatrix_array(imatrix, keep),
                                     ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if overrides:
        params.tt_overrides = ctypes.cast(_overrides_array(overrides, keep),
                                          ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    t0 = time.perf_counter()
    with atomic_path(Path(dest)) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ConversionError(f"llama.cpp's quantizer failed on {src} → {quant} (code {rc}); "
                                  "run with --verbose to see its log")
        info = validate_gguf(tmp)
    size = Path(dest).stat().st_size
    return QuantResult(Path(dest), quant.upper(), size, info.n_params, time.perf_counter() - t0,
                       fallbacks(info, quant) if not overrides else {})


def fallbacks(info, quant: str) -> dict[str, int]:
    """What llama.cpp used for the 2-D tensors a super-block preset could not cover (rows not a multiple
    of 256, e.g. SmolLM2's 576): its log says so, but that log is silenced, so edgellm reports it."""
    if quant.upper() not in SUPER_BLOCK_TYPES:
        return {}
    out: dict[str, int] = {}
    for t in info.tensors:
        if len(t.shape) == 2 and t.shape[0] % 256:
            out[t.type_name] = out.get(t.type_name, 0) + 1
    return out
