"""GGUF block formats edgellm writes itself: GPTQ-rounded blocks, packed bit for bit as llama.cpp reads them.

llama.cpp's quantizer rounds every block on its own (importance-weighted round-to-nearest with a scale
search). GPTQ (converters/gptq.py) instead rounds a tensor column by column and pushes each rounding
error onto the columns not yet rounded, along the inverse Gram matrix of the layer's inputs, so that
x·w rather than w stays close. That needs the block math in edgellm's hands: for each type here a Grid
(how a block's scale/min are fitted, how one column rounds, with exactly the float arithmetic of
llama.cpp's dequantizer) and a packer into ggml's byte layout. Hand-written: gguf.quants rounds only
to nearest and has no way to take given integers; llama.cpp's C quantizers cannot take them either.

Supported: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL (32-wide blocks) and Q4_K, Q5_K, Q6_K (256-wide
super-blocks, in converters/gguf_kblocks.py). Every packed block round-trips exactly through llama.cpp's
own `dequantize_row_*` (`llama_dequantize`, used by the tests as the judge).
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gguf
import numpy as np

from edgellm.errors import ConversionError

from .gguf_grids import IQ4_LEVELS, QT, MinGrid, ScaleGrid, _half, _high_bits, _nibbles
from .gguf_kblocks import KQUANTS, pack_k
from .gptq import Grid, gptq, values_error


def _pack_legacy(name: str, codes: np.ndarray, params) -> np.ndarray:
    """codes [n, nb, 32], params per block stacked to [n, nb] → [n, nb, type_size] bytes."""
    if name in ("Q4_1", "Q5_1"):
        d, m = params
        parts = [_half(d), _half(m)]
    else:
        parts = [_half(params)]
    if name == "Q8_0":
        parts.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    elif name in ("Q5_0", "Q5_1"):
        parts += [_high_bits(codes), _nibbles(codes)]
    else:                                   # Q4_0, Q4_1, IQ4_NL
        parts.append(_nibbles(codes))
    return np.concatenate(parts, axis=-1)


LEGACY: dict[str, Grid] = {
    "Q4_0": ScaleGrid(np.arange(-8, 8, dtype=np.float32), True),
    "Q5_0": ScaleGrid(np.arange(-16, 16, dtype=np.float32), True),
    "Q8_0": ScaleGrid(np.arange(-128, 128, dtype=np.float32), True),
    "IQ4_NL": ScaleGrid(IQ4_LEVELS, False),
    "Q4_1": MinGrid(15),
    "Q5_1": MinGrid(31),
}


def _stack(params: list, name: str):
    if name in ("Q4_1", "Q5_1"):
        return np.stack([p[0] for p in params], 1), np.stack([p[1] for p in params], 1)
    return np.stack(params, 1)


def grid_of(type_name: str) -> Grid:
    key = type_name.upper()
    if key in LEGACY:
        return LEGACY[key]
    if key in KQUANTS:
        return KQUANTS[key]
    raise ConversionError(f"edgellm cannot write {type_name} blocks itself; GPTQ covers {', '.join(GPTQ_TYPES)}")


def pack(type_name: str, codes: np.ndarray, params: list) -> np.ndarray:
    """Codes [n, K] and one row chunk's per-block parameters → raw ggml bytes [n, K / block · type_size]."""
    key = type_name.upper()
    n, k = codes.shape
    b = grid_of(key).block
    if key in KQUANTS:
        raw = pack_k(key, codes.reshape(n, k // b, b), params)
    else:
        raw = _pack_legacy(key, codes.reshape(n, k // b, b), _stack(params, key))
    return np.ascontiguousarray(raw.reshape(n, -1))


GPTQ_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class Blocks:
    """One tensor's GPTQ blocks: ggml type, raw bytes [rows, row_bytes] (HF row order), the float32 values
    llama.cpp computes from them, and the output error tr(E H Eᵀ) they leave."""

    type: str
    raw: np.ndarray
    values: np.ndarray
    error: float

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)


def fits(type_name: str, shape: tuple[int, ...]) -> bool:
    """Whether a 2-D tensor's rows (the input dimension, ggml's ne0) are a whole number of the type's blocks."""
    return len(shape) == 2 and shape[1] % gguf.GGML_QUANT_SIZES[QT[type_name.upper()]][0] == 0


def gptq_tensor(w: np.ndarray, gram: np.ndarray, type_name: str, *, factor=None, rows: int = 4096) -> Blocks:
    """GPTQ blocks of w [N, K] (HF layout) in ggml type `type_name`, for inputs with Gram matrix `gram`."""
    key = type_name.upper()
    grid = grid_of(key)
    if not fits(key, w.shape):
        raise ConversionError(f"a {w.shape[1]}-wide row is not a whole number of {key} blocks")
    codes, params, values = gptq(w, gram, grid, factor=factor, rows=rows)
    raw = np.concatenate([pack(key, codes[i * rows:(i + 1) * rows], p) for i, p in enumerate(params)])
    return Blocks(key, raw, values, values_error(w, values, gram))


# -- llama.cpp's own dequantizer: the judge of byte validity -------------------------------------------------
@cache
def _ggml_base() -> ctypes.CDLL:
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).exists():
            return ctypes.CDLL(str(libdir / name))
    raise ConversionError(f"llama.cpp's libggml-base was not found in {libdir}")


def _row_fn(type_name: str) -> Callable:
    key = type_name.upper()
    symbol = "dequantize_row_" + (key[:-1].lower() + "K" if key.endswith("_K") else key.lower())
    fn = getattr(_ggml_base(), symbol)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    return fn


def llama_dequantize(type_name: str, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    """float32 [rows, n_per_row] from raw ggml bytes [rows, row_bytes], by llama.cpp's dequantize_row_*."""
    raw = np.ascontiguousarray(raw, np.uint8)
    out = np.empty((raw.shape[0], n_per_row), np.float32)
    _row_fn(type_name)(raw.ctypes.data, out.ctypes.data, out.size)
    return out





def llama_quantize(type_name: str, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's own rounding of w [rows, n_per_row] (ggml_quantize_chunk, with the importance matrix):
    the per-tensor blocks its quantizer writes, for comparisons with GPTQ on one layer."""
    w = np.ascontiguousarray(w, np.float32)
    rows, k = w.shape
    qtype = QT[type_name.upper()]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, k // block * size), np.uint8)
    fn = _ggml_base().ggml_quantize_chunk
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_size_t
    imp = None if importance is None else np.ascontiguousarray(importance, np.float32)
    fn(int(qtype), w.ctypes.data, out.ctypes.data, 0, rows, k, None if imp is None else imp.ctypes.data)
    return out


__all__ = ["GPTQ_TYPES", "Blocks", "fits", "gptq_tensor", "grid_of", "llama_dequantize", "llama_quantize", "pack"]
