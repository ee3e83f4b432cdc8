"""Strict structural validation of GGUF files before any native code opens them.

Hand-written on purpose. Model files are untrusted: gguf's GGUFReader memory-maps the file and trusts
its lengths and counts (a bogus count can raise IndexError/MemoryError or loop for ages, and tensors may
point outside the file), and llama.cpp's loader is native code we must not feed hostile input. This
reader streams the header once, bounds every length and count by the bytes left *before* looping (so
work is O(header bytes)), never reads tensor data, and checks what llama.cpp would otherwise abort or
fail on (types of the keys it reads, tensor layout, hparams against tensor shapes, tokenizer arrays).
Constants (value/tensor types, block sizes, key and tensor names) come from the gguf package.
This module is the bounded format reader; the llama.cpp-specific rules live in edgellm.gguf_rules.
"""
from __future__ import annotations

import os
import struct
from array import array
from typing import Any, BinaryIO

import gguf
from gguf import GGUFValueType as VT

from edgellm.errors import InvalidModelError, UnsupportedModelError
from edgellm.gguf_info import MAX_STRING, ArraySummary, Cursor, GGUFInfo, TensorInfo, quote
from edgellm.gguf_rules import ARCH_NAMES, STR, U32, check_arch, check_key_types, check_merges, check_tokenizer

__all__ = ["ArraySummary", "GGUFInfo", "TensorInfo", "validate_gguf", "validate_gguf_stream"]

MAX_KEY = 65535                # GGUF spec limit on key length
MAX_COUNT = 1_000_000          # tensors or KV pairs
MAX_ELEMENTS = 1 << 40         # per tensor and per dimension
MAX_NAME = 63                  # GGML_MAX_NAME (64) including the NUL
MAX_STRINGS = 1 << 22          # entries of one string array (vocabularies are ~32k-262k)
SUMMARY_OVER = 64              # arrays longer than this are kept as ArraySummary
_CHUNK = 1 << 20
_KNOWN_TYPES = {int(t): t for t in gguf.GGML_QUANT_SIZES}
_REMOVED_TYPES = {4, 5, 31, 32, 33, 36, 37, 38}  # Q4_2, Q4_3, Q4_0_4_4..., IQ4_NL_4_4...: gone from ggml
_SCALAR = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
           VT.FLOAT32: "f", VT.BOOL: "B", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d"}
_U64 = struct.Struct("<Q")
_TK = gguf.Keys.Tokenizer


def validate_gguf(path: str | os.PathLike, *, require_arch: bool = True) -> GGUFInfo:
    """Validate a GGUF file's structure (header, metadata, tensor table, layout) without reading tensor data."""
    p = os.fspath(path)
    try:
        size = os.path.getsize(p)
        f = open(p, "rb")
    except OSError as e:
        raise InvalidModelError(f"{os.path.basename(p)}: cannot read the file ({e.strerror})") from None
    with f:
        info = validate_gguf_stream(f, size, os.path.basename(p), require_arch=require_arch)
    info.path = p
    return info


def validate_gguf_stream(f: BinaryIO, file_size: int, name: str = "<stream>", require_arch: bool = True) -> GGUFInfo:
    """Validate a GGUF read from f (positioned at its start) whose total size is file_size.

    require_arch=False tolerates a missing or unknown architecture (adapters, vocab-only files) and
    then skips the architecture- and tokenizer-dependent checks.
    """
    c = Cursor(f, file_size, name)
    if file_size < 24:
        c.fail(f"file is {file_size:,} bytes, shorter than a GGUF header (24 bytes)")
    magic, version = c.unpack("<II", 8, "header")
    if magic != gguf.GGUF_MAGIC:
        c.fail(f"not a GGUF file (magic {magic.to_bytes(4, 'little')!r}, expected b'GGUF')")
    if version == 1:
        raise UnsupportedModelError(f"{name}: GGUF version 1 is too old; convert the model again")
    if version not in (2, 3):
        c.fail(f"unknown GGUF version {version} (expected 2 or 3)")
    n_tensors, n_kv = c.unpack("<QQ", 16, "header counts")
    room = c.left()
    if n_tensors > MAX_COUNT or n_tensors * 33 > room:
        c.fail(f"tensor count {n_tensors:,} is impossible for a {file_size:,}-byte file")
    if n_kv > MAX_COUNT or n_kv * 14 + n_tensors * 33 > room:
        c.fail(f"KV count {n_kv:,} is impossible for a {file_size:,}-byte file")
    meta, types = _read_kv(c, n_kv)
    alignment = meta.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if types.get(gguf.Keys.General.ALIGNMENT, U32) != U32 or alignment < 1 or alignment & (alignment - 1):
        c.fail(f"general.alignment must be a UINT32 power of two, "
               f"got {types.get('general.alignment')} {quote(alignment)}")
    tensors = _read_tensors(c, n_tensors)
    data_offset = -(-c.tell() // alignment) * alignment
    info = GGUFInfo(name, file_size, version, alignment, data_offset, meta, tensors, types)
    _check_layout(c, info)
    check_key_types(c, info)
    arch = meta.get(gguf.Keys.General.ARCHITECTURE)
    if arch is None and require_arch:
        c.fail("missing general.architecture")
    if require_arch and arch not in ARCH_NAMES:
        known = ", ".join(sorted(ARCH_NAMES)[:8])
        raise UnsupportedModelError(f"{name}: unknown architecture {quote(arch)} (known include {known}, ...)")
    if arch in ARCH_NAMES and require_arch:
        check_tokenizer(c, info)
        check_arch(c, info, arch)
    return info


def _read_kv(c: Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, str]]:
    meta: dict[str, Any] = {}
    types: dict[str, str] = {}
    for i in range(n_kv):
        kb = c.raw_string(f"key of KV pair {i}", MAX_KEY)
        if not kb:
            c.fail(f"key of KV pair {i} is empty")
        if not (kb.isascii() and kb.decode("ascii").isprintable()):
            c.fail(f"key of KV pair {i} ({kb[:40]!r}) is not printable ASCII")
        key = kb.decode("ascii")
        if key in meta:
            c.fail(f"duplicate key '{key}' (KV pair {i})")
        vt = c.u32(f"value type of '{key}'")
        if vt == VT.ARRAY:
            et, n = c.unpack("<IQ", 12, f"array header of '{key}'")
            if et == VT.ARRAY:
                raise UnsupportedModelError(f"{c.name}: '{key}' is a nested array, which llama.cpp does not read")
            if et not in _SCALAR and et != VT.STRING:
                c.fail(f"'{key}' has unknown array element type {et}")
            esize = 8 if et == VT.STRING else struct.calcsize(_SCALAR[et])
            if n * esize > c.left():
                c.fail(f"array '{key}' claims {n:,} elements ({n * esize:,}+ bytes) but only {c.left():,} bytes remain")
            ename = VT(et).name
            types[key] = f"ARRAY[{ename}]"
            if et == VT.STRING:
                if n > MAX_STRINGS:
                    c.fail(f"string array '{key}' has {n:,} entries (limit {MAX_STRINGS:,})")
                items = c.string_list(n, f"'{key}'")
                try:
                    b"\0".join(items).decode("utf-8")
                except UnicodeDecodeError:
                    c.fail(f"'{key}'[{next(j for j, s in enumerate(items) if not _utf8(s))}] is not valid UTF-8")
                if key == _TK.LIST:
                    c.tokens = items
                elif key == _TK.MERGES:
                    check_merges(c, items)
                meta[key] = [s.decode() for s in items] if n <= SUMMARY_OVER else ArraySummary(ename, n)
            elif key == _TK.TOKEN_TYPE and et == VT.INT32:
                if 4 * n > MAX_STRING:
                    c.fail(f"'{key}' has {n:,} entries, more than any vocabulary")
                c.fill(4 * n, f"'{key}' values")
                c.token_types = array("i", c.buf[c.pos:c.pos + 4 * n])
                c.pos += 4 * n
                meta[key] = list(c.token_types) if n <= SUMMARY_OVER else ArraySummary(ename, n)
            elif n <= SUMMARY_OVER:
                vals = c.unpack(f"<{n}{_SCALAR[et]}", n * esize, f"'{key}' values")
                meta[key] = [bool(v) for v in vals] if et == VT.BOOL else list(vals)
            else:
                c.skip(n * esize, f"'{key}' values")
                meta[key] = ArraySummary(ename, n)
        elif vt == VT.STRING:
            types[key] = STR
            meta[key] = c.string(f"value of '{key}'")
        elif vt in _SCALAR:
            fmt = _SCALAR[vt]
            v = c.unpack("<" + fmt, struct.calcsize(fmt), f"value of '{key}'")[0]
            if vt == VT.BOOL:
                if v > 1:
                    c.fail(f"bool '{key}' has value {v} (must be 0 or 1)")
                v = bool(v)
            types[key] = VT(vt).name
            meta[key] = v
        else:
            c.fail(f"'{key}' has unknown value type {vt}")
    return meta, types


def _utf8(s: bytes) -> bool:
    try:
        return s.decode("utf-8") is not None
    except UnicodeDecodeError:
        return False


def _read_tensors(c: Cursor, n_tensors: int) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i}", MAX_KEY)
        if not name or len(name.encode()) > MAX_NAME:
            c.fail(f"tensor {i} name {name[:70]!r} must be 1..{MAX_NAME} bytes")
        if name in seen:
            c.fail(f"duplicate tensor name '{name}' (tensor {i})")
        seen.add(name)
        n_dims = c.u32(f"dimension count of tensor '{name}'")
        if not 1 <= n_dims <= 4:
            c.fail(f"tensor '{name}' has {n_dims} dimensions (must be 1..4)")
        shape = c.unpack(f"<{n_dims}Q", 8 * n_dims, f"shape of tensor '{name}'")
        n_el = 1
        for d in shape:
            if not 1 <= d <= MAX_ELEMENTS:
                c.fail(f"tensor '{name}' has a bad dimension {d:,} in shape {list(shape)}")
            n_el *= d
        if n_el > MAX_ELEMENTS:
            c.fail(f"tensor '{name}' shape {list(shape)} has {n_el:,} elements (limit {MAX_ELEMENTS:,})")
        t, rel = c.unpack("<IQ", 12, f"type and offset of tensor '{name}'")
        if t not in _KNOWN_TYPES:
            if t in _REMOVED_TYPES or t < 64:
                raise UnsupportedModelError(f"{c.name}: tensor '{name}' has ggml type {t}, "
                                            f"which is removed or unknown here")
            c.fail(f"tensor '{name}' has type {t}, which is not a ggml type")
        qt = _KNOWN_TYPES[t]
        block, tsize = gguf.GGML_QUANT_SIZES[qt]
        if shape[0] % block:
            c.fail(f"tensor '{name}' row length {shape[0]:,} is not a multiple of the {qt.name} block size {block}")
        tensors.append(TensorInfo(name, tuple(shape), t, qt.name, rel, n_el // block * tsize, n_el))
    return tensors


def _check_layout(c: Cursor, info: GGUFInfo) -> None:
    """Offsets aligned, data inside the file, no overlap, and laid out back to back as llama.cpp requires."""
    if info.tensors and info.data_offset > info.file_size:
        c.fail(f"tensor data would start at {info.data_offset:,}, past the end of the file ({info.file_size:,} bytes)")
    for t in info.tensors:
        if t.offset % info.alignment:
            c.fail(f"tensor '{t.name}' offset {t.offset:,} is not a multiple of the alignment {info.alignment}")
        rel, t.offset = t.offset, info.data_offset + t.offset
        if rel > info.file_size or t.offset + t.n_bytes > info.file_size:
            c.fail(f"tensor '{t.name}' data [offset {t.offset:,}, {t.n_bytes:,} bytes] runs past the end "
                   f"of the file ({info.file_size:,} bytes)")
    by_offset = sorted(info.tensors, key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if a.offset + a.n_bytes > b.offset:
            c.fail(f"tensors '{a.name}' [offset {a.offset:,}, {a.n_bytes:,} bytes] and '{b.name}' "
                   f"[offset {b.offset:,}] overlap")
    expected = info.data_offset
    for t in info.tensors:
        if t.offset != expected:
            c.fail(f"tensor '{t.name}' is at offset {t.offset:,} but llama.cpp expects {expected:,} "
                   "(tensors must follow each other in table order, padded to the alignment)")
        expected += -(-t.n_bytes // info.alignment) * info.alignment


