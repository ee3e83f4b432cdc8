"""GGUF blocks read back as the integers, scales and zero points onnxruntime's MatMulNBits takes — no
re-rounding. What a GGUF block stores is decoded exactly (codes and fp16 fields), then written in the
MatMulNBits form value = (code − zero_point) · scale:

| GGUF | value | MatMulNBits | exact? |
| --- | --- | --- | --- |
| Q4_0 | (q − 8)·d, block 32 | 4-bit/32, zero point 8 | yes |
| Q4_1 | q·d + m, block 32 | 4-bit/32, float zero point −m/d | to float32 rounding of −m/d |
| Q5_0 | (q − 16)·d, block 32 | 8-bit/32, zero point 16 | yes |
| Q8_0 | q·d, block 32 | 8-bit/32, zero point 128 | yes |
| IQ4_NL | d·level[q], block 32 | 8-bit/32, code level[q]+128, zero point 128 | yes |
| Q4_K | d·sc·q − dmin·m, block 32 | 4-bit/32, scale d·sc, float zero point | to float32 rounding |
| Q6_K | d·sc·(q − 32), block 16 | 8-bit/16, scale d·sc, zero point 32 | yes |

Q5_1 and Q5_K (5-bit codes with a float minimum) would need 8-bit blocks with float zero points, which
onnxruntime's CPU MatMulNBits refuses ("does not support 8-bit weights with floating-point zero points");
Q2_K, Q3_K and the other IQ types are not decoded here. Such tensors cannot be carried over exactly: the
caller re-rounds them or keeps the model on llama.cpp. fp16 scales widen to float32 exactly, and
d·sc (an fp16 times a 6- or 8-bit integer) is exact in float32.

Hand-written: gguf.quants dequantizes to floats but does not hand out the codes and block fields, and
onnxruntime has no GGUF importer. Each decoder is checked against llama.cpp's own dequantizer in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

QK = 32
QK_K = 256
IQ4_LEVELS = np.array(gguf.quants.IQ4_NL.kvalues, np.int16)
NOT_EXACT = {
    "Q5_1": "5-bit codes with a float minimum need 8-bit blocks with float zero points, which onnxruntime's CPU "
            "MatMulNBits does not take",
    "Q5_K": "5-bit codes with a float minimum need 8-bit blocks with float zero points, which onnxruntime's CPU "
            "MatMulNBits does not take",
}


@dataclass
class Blocks:
    """One matrix [n, k] as MatMulNBits blocks: value = (codes − zero_points) · scales, per block."""

    bits: int
    block: int
    codes: np.ndarray        # uint8 [n, n_blocks, block], each < 2**bits
    scales: np.ndarray       # float32 [n, n_blocks]
    zero_points: np.ndarray  # uint8 or float32 [n, n_blocks]

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def k(self) -> int:
        return self.codes.shape[1] * self.block

    @property
    def float_zero_points(self) -> bool:
        return self.zero_points.dtype == np.float32

    def dequantize(self) -> np.ndarray:
        """float32 [n, k] as onnxruntime computes it."""
        w = (self.codes.astype(np.float32) - self.zero_points[..., None].astype(np.float32)) * self.scales[..., None]
        return w.reshape(self.n, -1)

    def as_block(self, block: int) -> Blocks:
        """The same values in smaller blocks (scales and zero points repeated): exact."""
        if block == self.block:
            return self
        r = self.block // block
        return Blocks(self.bits, block, self.codes.reshape(self.n, -1, block), np.repeat(self.scales, r, axis=1),
                      np.repeat(self.zero_points, r, axis=1))

    def as_bits(self, bits: int) -> Blocks:
        """Wider codes (4 → 8 bits); exact with integer zero points."""
        if bits == self.bits:
            return self
        if self.float_zero_points:
            raise ValueError("8-bit blocks cannot take float zero points in onnxruntime's CPU MatMulNBits")
        return Blocks(bits, self.block, self.codes, self.scales, self.zero_points)

    def rows(self, order: np.ndarray) -> Blocks:
        return Blocks(self.bits, self.block, self.codes[order], self.scales[order], self.zero_points[order])


def merge(parts: list[Blocks]) -> Blocks | None:
    """Row-stack several matrices (q, k, v; gate, up) in one common layout, or None when none exists
    exactly (a float-zero-point 4-bit part beside an 8-bit one)."""
    bits, block = max(p.bits for p in parts), min(p.block for p in parts)
    if bits == 8 and any(p.float_zero_points for p in parts):
        return None
    floating = any(p.float_zero_points for p in parts)
    same = [p.as_block(block).as_bits(bits) for p in parts]
    zps = [p.zero_points.astype(np.float32) if floating else p.zero_points for p in same]
    return Blocks(bits, block, np.concatenate([p.codes for p in same]), np.concatenate([p.scales for p in same]),
                  np.concatenate(zps))


def decode(type_name: str, raw: np.ndarray, n: int, k: int) -> Blocks | None:
    """A GGUF tensor's raw bytes ([n, k] in HF layout: n rows of k) as Blocks, or None if not exact."""
    fn = _DECODERS.get(type_name)
    if fn is None:
        return None
    return fn(np.ascontiguousarray(raw, np.uint8).reshape(n, -1), n, k)


def _fp16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 fields (uint8 [..., 2]) as float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 32-wide nibble layout: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(raw: np.ndarray, n: int, k: int) -> Blocks:
    b = raw.reshape(n, k // QK, 18)
    return Blocks(4, QK, _nibbles(b[..., 2:]), _fp16(b[..., 0:2]), np.full((n, k // QK), 8, np.uint8))


def _q4_1(raw: np.ndarray, n: int, k: int) -> Blocks:
    b = raw.reshape(n, k // QK, 20)
    d, m, codes = _fp16(b[..., 0:2]), _fp16(b[..., 2:4]), _nibbles(b[..., 4:])
    return _with_min(codes, d, m)


def _with_min(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> Blocks:
    """value = q·d + m as (q − zp)·d with zp = −m/d; a block with d = 0 holds m everywhere: code 1, scale m."""
    flat = d == 0
    safe = np.where(flat, 1.0, d).astype(np.float32)
    zp = np.where(flat, 0.0, -m / safe).astype(np.float32)
    scales = np.where(flat, m, d).astype(np.float32)
    codes = np.where(flat[..., None], np.uint8(1), codes).astype(np.uint8)
    return Blocks(4, codes.shape[-1], codes, scales, zp)


def _q5_0(raw: np.ndarray, n: int, k: int) -> Blocks:
    b = raw.reshape(n, k // QK, 22)
    qh = np.ascontiguousarray(b[..., 2:6]).view("<u4")[..., 0]
    high = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    return Blocks(8, QK, _nibbles(b[..., 6:]) | high, _fp16(b[..., 0:2]), np.full((n, k // QK), 16, np.uint8))


def _q8_0(raw: np.ndarray, n: int, k: int) -> Blocks:
    b = raw.reshape(n, k // QK, 34)
    codes = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return Blocks(8, QK, codes, _fp16(b[..., 0:2]), np.full((n, k // QK), 128, np.uint8))


def _iq4_nl(raw: np.ndarray, n: int, k: int) -> Blocks:
    b = raw.reshape(n, k // QK, 18)
    codes = (IQ4_LEVELS[_nibbles(b[..., 2:])] + 128).astype(np.uint8)
    return Blocks(8, QK, codes, _fp16(b[..., 0:2]), np.full((n, k // QK), 128, np.uint8))


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a K-quant super-block from its 12 packed bytes (get_scale_min_k4)."""
    s = s.astype(np.uint8)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(raw: np.ndarray, n: int, k: int) -> Blocks:
    b = raw.reshape(n, k // QK_K, 144)
    d, dmin = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    sc, mn = _scale_min_k4(b[..., 4:16])
    qs = b[..., 16:].reshape(n, k // QK_K, 4, 32)          # 4 chunks of 64 elements
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3)          # [n, sb, chunk, lo/hi, 32]: sub-blocks 2c, 2c+1
    codes = codes.reshape(n, -1, QK)
    scale = (d[..., None] * sc).reshape(n, -1)              # exact: fp16 × 6-bit integer
    low = (dmin[..., None] * mn).reshape(n, -1)             # value = scale·q − low
    return _with_min(codes, scale, -low)


def _q6_k(raw: np.ndarray, n: int, k: int) -> Blocks:
    b = raw.reshape(n, k // QK_K, 210)
    ql, qh = b[..., 0:128].reshape(n, -1, 2, 64), b[..., 128:192].reshape(n, -1, 2, 32)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)  # 16 scales, one per 16 elements
    d = _fp16(b[..., 208:210])
    q1 = (ql[..., 0:32] & 0x0F) | ((qh & 3) << 4)
    q2 = (ql[..., 32:64] & 0x0F) | (((qh >> 2) & 3) << 4)
    q3 = (ql[..., 0:32] >> 4) | (((qh >> 4) & 3) << 4)
    q4 = (ql[..., 32:64] >> 4) | (((qh >> 6) & 3) << 4)
    codes = np.stack([q1, q2, q3, q4], axis=3).reshape(n, -1, 16)   # [n, sb*2 halves*4 quarters*2, 16]
    scale = (d[..., None] * sc).reshape(n, -1)
    return Blocks(8, 16, codes.astype(np.uint8), scale.astype(np.float32), np.full(scale.shape, 32, np.uint8))


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q8_0": _q8_0, "IQ4_NL": _iq4_nl, "Q4_K": _q4_k,
             "Q6_K": _q6_k}
EXACT = tuple(_DECODERS)
