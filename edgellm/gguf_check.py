"""Strict structural validation of GGUF files before any native code opens them.

Hand-written on purpose. Model files are untrusted: gguf's GGUFReader memory-maps the file and trusts
its lengths and counts (a bogus count can raise IndexError/MemoryError or loop for ages, and tensors may
point outside the file), and llama.cpp's loader is native code we must not feed hostile input. This
reader streams the header once, bounds every length and count by the bytes left *before* looping (so
work is O(header bytes)), never reads tensor data, and checks what llama.cpp would otherwise abort or
fail on (types of the keys it reads, tensor layout, hparams against tensor shapes, tokenizer arrays).
Constants (value/tensor types, block sizes, key and tensor names) come from the gguf package.
"""
from __future__ import annotations

import os
import re
import struct
from array import array
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NoReturn

import gguf
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT

from edgellm.errors import InvalidModelError, UnsupportedModelError

MAX_STRING = 16 << 20          # one metadata string (chat templates, HF tokenizer JSON fit easily)
MAX_KEY = 65535                # GGUF spec limit on key length
MAX_COUNT = 1_000_000          # tensors or KV pairs
MAX_ELEMENTS = 1 << 40         # per tensor and per dimension
MAX_NAME = 63                  # GGML_MAX_NAME (64) including the NUL
MAX_HPARAM = 1_000_000
MAX_LAYERS = 512               # LLAMA_MAX_LAYERS; llama.cpp aborts beyond it
SUMMARY_OVER = 64              # arrays longer than this are kept as ArraySummary
_CHUNK = 1 << 20
_REMOVED_TYPES = {4, 5, 31, 32, 33, 36, 37, 38}  # Q4_2, Q4_3, Q4_0_4_4..., IQ4_NL_4_4...: gone from ggml
_SCALAR = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
           VT.FLOAT32: "f", VT.BOOL: "B", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d"}
_U64 = struct.Struct("<Q")
_ARCH_NAMES = frozenset(gguf.MODEL_ARCH_NAMES.values())
_ARCH_BY_NAME = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
_TENSOR_SUFFIXES = {"weight", "bias", "scale", "scales", "input_scale", "lora_a", "lora_b"}
_BID = re.compile(r"^(.*?)\.(0|[1-9][0-9]{0,5})\.(.*)$")
_BYTE_TOKEN = re.compile(rb"<0x[0-9A-Fa-f]{2}>")

# What llama.cpp (as vendored in llama-cpp-python 0.3.36) accepts; anything else fails to load.
TOKENIZER_MODELS = {"none", "no_vocab", "llama", "bert", "gpt2", "hybriddna", "whitespace", "t5", "rwkv",
                    "plamo2", "gemma4"}
_BPE_MODELS = {"gpt2", "hybriddna", "whitespace"}
PRE_TOKENIZERS = set("""default minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2
jina-v5-nano deepseek-llm deepseek-coder deepseek-v3 spark2_5 youtu falcon mpt starcoder gpt-2 phi-2 jina-es
jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jais-2 gemma4 granite-embed-multi-311m
sarvam-moe jina-v1-en jina-v2-code roberta-bpe whitespace refact command-r qwen2 deepseek-r1-qwen kormo f2llmv2
qwen35 stablelm2 olmo dbrx smaug-bpe poro-chat chatglm-bpe glm4 glm5 viking jais tekken smollm codeshell bloom
gpt3-finnish exaone exaone4 exaone-moe chameleon minerva-7b megrez gpt-4o llama4 kanana2 talkie
granite-embed-multi-97m tiny_aya cohere2moe superbpe trillion granite-docling bailingmoe bailingmoe2 llada-moe
seed-coder hunyuan hunyuan-dense hy_v4 joyai-llm kimi-k2 ufakzeka grok-2 afmoe laguna minimax-m2 solar-open
mellum2""".split())
ROPE_SCALING_TYPES = {"none", "linear", "yarn", "longrope"}

# Types llama.cpp's GGUFMeta enforces for the keys it reads (a mismatch makes it throw or abort).
_U32, _F32, _BOOL, _STR = "UINT32", "FLOAT32", "BOOL", "STRING"
_TK = gguf.Keys.Tokenizer
TOKEN_ID_KEYS = [v for k, v in vars(_TK).items() if k.endswith("_ID")]
_KEY_TYPES: dict[str, str | tuple[str, ...]] = {
    "general.architecture": _STR, "general.alignment": _U32, "general.file_type": _U32,
    "general.quantization_version": _U32, "general.name": _STR, "split.count": "UINT16",
    _TK.MODEL: _STR, _TK.PRE: _STR, _TK.LIST: "ARRAY[STRING]", _TK.TOKEN_TYPE: "ARRAY[INT32]",
    _TK.SCORES: ("ARRAY[FLOAT32]", "ARRAY[INT32]"), _TK.MERGES: "ARRAY[STRING]", _TK.TOKEN_TYPE_COUNT: _U32,
    _TK.ADD_BOS: _BOOL, _TK.ADD_EOS: _BOOL, _TK.ADD_SEP: _BOOL, _TK.ADD_PREFIX: _BOOL,
    _TK.REMOVE_EXTRA_WS: _BOOL, _TK.CHAT_TEMPLATE: _STR, **{k: _U32 for k in TOKEN_ID_KEYS}}
_ARCH_KEY_TYPES: dict[str, str] = {
    **{k: _U32 for k in """context_length embedding_length embedding_length_out block_count vocab_size
       expert_count expert_group_count expert_group_used_count leading_dense_block_count
       expert_feed_forward_length expert_shared_feed_forward_length expert_shared_count nextn_predict_layers
       pooling_type attention.key_length attention.value_length attention.key_length_swa
       attention.value_length_swa attention.sliding_window attention.q_lora_rank attention.kv_lora_rank
       rope.dimension_count rope.dimension_count_swa rope.scaling.original_context_length""".split()},
    **{k: _F32 for k in """rope.freq_base rope.freq_base_swa rope.scaling.factor rope.scale_linear
       rope.scaling.attn_factor rope.scaling.alpha attention.layer_norm_epsilon
       attention.layer_norm_rms_epsilon attention.clamp_kqv attention.max_alibi_bias logit_scale
       embedding_scale residual_scale attention.scale attn_logit_softcapping final_logit_softcapping
       expert_weights_scale""".split()},
    **{k: _BOOL for k in "attention.causal rope.scaling.finetuned use_parallel_residual expert_weights_norm".split()},
    "rope.scaling.type": _STR}
# llama.cpp reads these as one u32 or a per-layer array of u32/i32 with block_count entries.
_PER_LAYER_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv", "expert_used_count")


@dataclass(frozen=True)
class ArraySummary:
    """Stand-in for a long metadata array (e.g. 49k tokens): keeps memory bounded, keeps the facts."""
    type_name: str
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass
class TensorInfo:
    """One tensor-table entry; shape is in ggml order (ne0 first), offset absolute in the file."""
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int
    n_bytes: int
    n_elements: int


@dataclass
class GGUFInfo:
    """Everything the header says, after validation; tensor data is never read."""
    path: str
    file_size: int
    version: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    kv_types: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get(gguf.Keys.General.ARCHITECTURE, ""))

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def bytes_by_type(self) -> dict[str, tuple[int, int]]:
        """Tensor count and data bytes per ggml type: what the quantization really is."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.tensors:
            n, b = out.get(t.type_name, (0, 0))
            out[t.type_name] = (n + 1, b + t.n_bytes)
        return out

    @property
    def file_type_name(self) -> str | None:
        """general.file_type as llama.cpp names it ('Q4_1', 'Q4_K_M', ...); None when absent."""
        ft = self.metadata.get(gguf.Keys.General.FILE_TYPE)
        if not isinstance(ft, int):
            return None
        try:
            name = gguf.LlamaFileType(ft & ~gguf.LlamaFileType.GUESSED).name
        except ValueError:
            return f"unknown({ft})"
        return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")

    def quant_summary(self) -> str:
        """The ggml type holding most of the tensor bytes (the file's effective quantization)."""
        by = self.bytes_by_type()
        return max(by, key=lambda k: by[k][1]) if by else "none"

    def hparams(self) -> dict[str, Any]:
        """Core hyper-parameters (per-layer ones may be lists); vocab_size falls back to the token count."""
        a, m = self.architecture, self.metadata
        out = {k: m.get(f"{a}.{key}") for k, key in (
            ("block_count", "block_count"), ("embedding_length", "embedding_length"),
            ("feed_forward_length", "feed_forward_length"), ("head_count", "attention.head_count"),
            ("head_count_kv", "attention.head_count_kv"), ("context_length", "context_length"),
            ("vocab_size", "vocab_size"))}
        if out["head_count_kv"] is None:
            out["head_count_kv"] = out["head_count"]
        if out["vocab_size"] is None and _TK.LIST in m:
            out["vocab_size"] = len(m[_TK.LIST])
        return out


class _Cursor:
    """Little-endian reader over a stream that never reads past the stated file size."""

    def __init__(self, f: BinaryIO, size: int, name: str) -> None:
        self.f, self.size, self.name = f, size, name
        self.buf, self.pos, self.base = b"", 0, 0
        self.tokens: list[bytes] | None = None      # kept until the tokenizer checks, then dropped
        self.token_types: array | None = None

    def fail(self, msg: str) -> NoReturn:
        raise InvalidModelError(f"{self.name}: {msg}")

    def tell(self) -> int:
        return self.base + self.pos

    def left(self) -> int:
        return self.size - self.tell()

    def fill(self, n: int, what: str) -> None:
        if self.pos + n <= len(self.buf):
            return
        off = self.tell()
        if n > self.size - off:
            self.fail(f"{what} at offset {off:,} needs {n:,} bytes but the file ends at {self.size:,} bytes (truncated)")
        rest, end = self.buf[self.pos:], self.base + len(self.buf)
        want = min(max(n - len(rest), _CHUNK), self.size - end)
        data = self.f.read(want)
        while len(rest) + len(data) < n and (more := self.f.read(want - len(data))):
            data += more
        if len(rest) + len(data) < n:
            self.fail(f"{what}: the data ends at offset {end + len(data):,}, before the stated size {self.size:,}")
        self.buf, self.base, self.pos = rest + data, off, 0

    def unpack(self, fmt: str, n: int, what: str) -> tuple:
        self.fill(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)[0]

    def raw_string(self, what: str, limit: int = MAX_STRING) -> bytes:
        n = self.u64(f"{what} length")
        if n > limit:
            self.fail(f"{what} length {n:,} exceeds the limit of {limit:,} bytes")
        if n > self.left():
            self.fail(f"{what} length {n:,} at offset {self.tell() - 8:,} runs past the end of the file ({self.size:,} bytes)")
        self.fill(n, what)
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        s = self.raw_string(what, limit)
        try:
            return s.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def string_list(self, n: int, what: str) -> list[bytes]:
        """n raw strings; the tight loop is what keeps a 49k-token vocabulary fast."""
        out: list[bytes] = []
        append, unpack, buf, pos = out.append, _U64.unpack_from, self.buf, self.pos
        for i in range(n):
            if pos + 8 > len(buf):
                self.pos = pos
                self.fill(8, f"{what}[{i}] length")
                buf, pos = self.buf, self.pos
            ln = unpack(buf, pos)[0]
            pos += 8
            if pos + ln > len(buf) or ln > MAX_STRING:
                self.pos = pos
                if ln > MAX_STRING or ln > self.left():
                    self.fail(f"{what}[{i}] length {ln:,} at offset {self.tell() - 8:,} exceeds the limit or the file")
                self.fill(ln, f"{what}[{i}]")
                buf, pos = self.buf, self.pos
            append(buf[pos:pos + ln])
            pos += ln
        self.pos = pos
        return out

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            self.fail(f"{what} ({n:,} bytes at offset {self.tell():,}) runs past the end of the file ({self.size:,} bytes)")
        avail = len(self.buf) - self.pos
        if n <= avail:
            self.pos += n
            return
        n -= avail
        self.base, self.buf, self.pos = self.base + len(self.buf), b"", 0
        while n:
            data = self.f.read(min(n, _CHUNK))
            if not data:
                self.fail(f"{what}: the data ends at offset {self.base:,}, before the stated size {self.size:,}")
            n -= len(data)
            self.base += len(data)


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
    c = _Cursor(f, file_size, name)
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
    if types.get(gguf.Keys.General.ALIGNMENT, _U32) != _U32 or alignment < 1 or alignment & (alignment - 1):
        c.fail(f"general.alignment must be a UINT32 power of two, got {types.get('general.alignment')} {alignment!r}")
    tensors = _read_tensors(c, n_tensors)
    data_offset = -(-c.tell() // alignment) * alignment
    info = GGUFInfo(name, file_size, version, alignment, data_offset, meta, tensors, types)
    _check_layout(c, info)
    _check_key_types(c, info)
    arch = meta.get(gguf.Keys.General.ARCHITECTURE)
    if arch is None and require_arch:
        c.fail("missing general.architecture")
    if require_arch and arch not in _ARCH_NAMES:
        known = ", ".join(sorted(_ARCH_NAMES)[:8])
        raise UnsupportedModelError(f"{name}: unknown architecture '{arch}' (known include {known}, ...)")
    if arch in _ARCH_NAMES and require_arch:
        _check_tokenizer(c, info)
        _check_arch(c, info, arch)
    return info


def _read_kv(c: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, str]]:
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
                items = c.string_list(n, f"'{key}'")
                try:
                    b"\0".join(items).decode("utf-8")
                except UnicodeDecodeError:
                    c.fail(f"'{key}'[{next(j for j, s in enumerate(items) if not _utf8(s))}] is not valid UTF-8")
                if key == _TK.LIST:
                    c.tokens = items
                elif key == _TK.MERGES:
                    _check_merges(c, items)
                meta[key] = [s.decode() for s in items] if n <= SUMMARY_OVER else ArraySummary(ename, n)
            elif key == _TK.TOKEN_TYPE and et == VT.INT32:
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
            types[key] = _STR
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


def _check_merges(c: _Cursor, items: list[bytes]) -> None:
    for i, s in enumerate(items):
        if s.count(b" ") != 1 or s[:1] == b" " or s[-1:] == b" ":
            c.fail(f"tokenizer.ggml.merges[{i}] ({s[:40]!r}) is not two parts separated by one space")


def _read_tensors(c: _Cursor, n_tensors: int) -> list[TensorInfo]:
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
        if t not in QT._value2member_map_ or QT(t) not in gguf.GGML_QUANT_SIZES:
            if t in _REMOVED_TYPES or t < 64:
                raise UnsupportedModelError(f"{c.name}: tensor '{name}' has ggml type {t}, which is removed or unknown here")
            c.fail(f"tensor '{name}' has type {t}, which is not a ggml type")
        qt = QT(t)
        block, tsize = gguf.GGML_QUANT_SIZES[qt]
        if shape[0] % block:
            c.fail(f"tensor '{name}' row length {shape[0]:,} is not a multiple of the {qt.name} block size {block}")
        tensors.append(TensorInfo(name, tuple(shape), t, qt.name, rel, n_el // block * tsize, n_el))
    return tensors


def _check_layout(c: _Cursor, info: GGUFInfo) -> None:
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


def _check_key_types(c: _Cursor, info: GGUFInfo) -> None:
    arch = info.metadata.get(gguf.Keys.General.ARCHITECTURE)
    prefix = f"{arch}." if isinstance(arch, str) else None
    block_count = info.metadata.get(f"{arch}.block_count")
    for key, got in info.kv_types.items():
        want: str | tuple[str, ...] | None = _KEY_TYPES.get(key)
        if want is None and prefix and key.startswith(prefix):
            sub = key[len(prefix):]
            if sub in _PER_LAYER_KEYS:
                if got.startswith("ARRAY"):
                    if got not in ("ARRAY[UINT32]", "ARRAY[INT32]") or len(info.metadata[key]) != block_count:
                        c.fail(f"'{key}' must be a UINT32 or a {block_count}-entry UINT32/INT32 array, got {got} "
                               f"of {len(info.metadata[key])}")
                    continue
                want = _U32
            else:
                want = _ARCH_KEY_TYPES.get(sub)
        if want is not None and got not in ((want,) if isinstance(want, str) else want):
            c.fail(f"'{key}' has type {got} but llama.cpp reads it as {want if isinstance(want, str) else ' or '.join(want)}")
    for key in (f"{arch}.rope.scaling.type",):
        if key in info.metadata and info.metadata[key] not in ROPE_SCALING_TYPES:
            c.fail(f"'{key}' is {info.metadata[key]!r}, not one of {sorted(ROPE_SCALING_TYPES)}")
    if info.metadata.get("split.count", 0) > 1:
        raise UnsupportedModelError(f"{c.name}: split GGUF files are not supported; merge them with llama-gguf-split")


def _hp(c: _Cursor, m: dict, key: str, required: bool, lo: int = 1, hi: int = MAX_HPARAM) -> Any:
    v = m.get(key)
    if v is None:
        if required:
            c.fail(f"missing required key '{key}'")
        return None
    for x in (v if isinstance(v, list) else [v]):
        if not lo <= x <= hi:
            c.fail(f"'{key}' = {x:,} is out of range {lo}..{hi:,}")
    return v


def _check_arch(c: _Cursor, info: GGUFInfo, arch: str) -> None:
    m, a = info.metadata, arch
    march = _ARCH_BY_NAME[arch]
    kinds = gguf.MODEL_TENSORS.get(march, [])
    attention = gguf.MODEL_TENSOR.ATTN_Q in kinds or gguf.MODEL_TENSOR.ATTN_QKV in kinds
    n_layer = _hp(c, m, f"{a}.block_count", True, 1, MAX_HPARAM)
    if n_layer > MAX_LAYERS:
        raise UnsupportedModelError(f"{c.name}: {a}.block_count {n_layer:,} exceeds llama.cpp's limit of {MAX_LAYERS}")
    n_embd = _hp(c, m, f"{a}.embedding_length", True)
    _hp(c, m, f"{a}.context_length", arch != "clip")
    n_head = _hp(c, m, f"{a}.attention.head_count", attention, 0 if not attention else 1)
    dense = arch in _DENSE_ARCHS and not m.get(f"{a}.expert_count")
    n_head_kv = _hp(c, m, f"{a}.attention.head_count_kv", False, 1 if dense else 0)
    n_ff = _hp(c, m, f"{a}.feed_forward_length", dense, 1 if dense else 0)
    if isinstance(n_head, int) and isinstance(n_head_kv, int) and (n_head_kv < 1 or n_head % n_head_kv):
        c.fail(f"{a}.attention.head_count_kv {n_head_kv} does not divide head_count {n_head}")
    # Tensor names must be ones llama.cpp knows for this architecture (it refuses any extra tensor).
    plain = {gguf.TENSOR_NAMES[k] for k in kinds if "{bid}" not in gguf.TENSOR_NAMES[k]}
    per_block = {gguf.TENSOR_NAMES[k] for k in kinds if "{bid}" in gguf.TENSOR_NAMES[k]}
    blocks: set[int] = set()
    for t in info.tensors:
        base, _, suffix = t.name.rpartition(".")
        if suffix not in _TENSOR_SUFFIXES:
            base = t.name
        mt = _BID.match(base)
        if mt and f"{mt[1]}.{{bid}}.{mt[3]}" in per_block:
            if mt[1] == "blk":
                if int(mt[2]) >= n_layer:
                    c.fail(f"tensor '{t.name}' is in block {mt[2]} but {a}.block_count is {n_layer}")
                blocks.add(int(mt[2]))
        elif base not in plain:
            c.fail(f"tensor '{t.name}' is not a tensor of architecture '{a}'")
    if blocks and len(blocks) != n_layer:
        c.fail(f"block {min(set(range(n_layer)) - blocks)} has no tensors but {a}.block_count is {n_layer}")
    if dense and all(isinstance(x, int) for x in (n_head, n_ff, n_head_kv or 1)):
        _check_dense_shapes(c, info, arch, n_layer, n_embd, n_head, n_head_kv or n_head, n_ff)


_DENSE_ARCHS = {"llama", "qwen2", "qwen3"}
_FLOAT_TYPES = {"F32", "F16", "BF16"}
_NOT_WEIGHTS = {"I8", "I16", "I32", "I64", "F64"}


def _check_dense_shapes(c: _Cursor, info: GGUFInfo, arch: str, n_layer: int, n_embd: int, n_head: int,
                        n_head_kv: int, n_ff: int) -> None:
    """Shapes llama.cpp's llama/qwen2/qwen3 loaders will ask for, derived from the hyper-parameters."""
    m, a = info.metadata, arch
    if n_embd % n_head and f"{a}.attention.key_length" not in m:
        c.fail(f"{a}.embedding_length {n_embd} is not divisible by attention.head_count {n_head}")
    dk = m.get(f"{a}.attention.key_length", n_embd // n_head)
    dv = m.get(f"{a}.attention.value_length", n_embd // n_head)
    rot = m.get(f"{a}.rope.dimension_count")
    if arch == "llama" and rot is not None and rot != dk:
        c.fail(f"{a}.rope.dimension_count {rot} must equal the head size {dk}")
    if f"{a}.attention.layer_norm_rms_epsilon" not in m:
        c.fail(f"missing required key '{a}.attention.layer_norm_rms_epsilon'")
    n_vocab = len(m[_TK.LIST]) if _TK.LIST in m else m.get(f"{a}.vocab_size")
    q, k, v = dk * n_head, dk * n_head_kv, dv * n_head_kv
    spec: dict[str, tuple[tuple[int, ...], bool]] = {
        "token_embd.weight": ((n_embd, n_vocab), True), "output_norm.weight": ((n_embd,), True),
        "output.weight": ((n_embd, n_vocab), False), "output.bias": ((n_vocab,), False)}
    if isinstance(rot, int):
        spec["rope_freqs.weight"] = ((rot // 2,), False)
    fused = any(t.name.endswith(".attn_qkv.weight") for t in info.tensors)
    for i in range(n_layer):
        b = f"blk.{i}."
        spec.update({
            b + "attn_norm.weight": ((n_embd,), True), b + "ffn_norm.weight": ((n_embd,), True),
            b + "attn_q.weight": ((n_embd, q), not fused), b + "attn_k.weight": ((n_embd, k), not fused),
            b + "attn_v.weight": ((n_embd, v), not fused), b + "attn_qkv.weight": ((n_embd, q + k + v), False),
            b + "attn_q.bias": ((q,), False), b + "attn_k.bias": ((k,), False), b + "attn_v.bias": ((v,), False),
            b + "attn_qkv.bias": ((q + k + v,), False),
            b + "attn_output.weight": ((dv * n_head, n_embd), True), b + "attn_output.bias": ((n_embd,), False),
            b + "ffn_gate.weight": ((n_embd, n_ff), True), b + "ffn_down.weight": ((n_ff, n_embd), True),
            b + "ffn_up.weight": ((n_embd, n_ff), True), b + "ffn_gate.bias": ((n_ff,), False),
            b + "ffn_down.bias": ((n_embd,), False), b + "ffn_up.bias": ((n_ff,), False)})
        if arch == "qwen3":
            spec[b + "attn_q_norm.weight"] = ((dk,), True)
            spec[b + "attn_k_norm.weight"] = ((dk,), True)
    present = {t.name: t for t in info.tensors}
    for name, (shape, required) in spec.items():
        t = present.get(name)
        if t is None:
            if required:
                c.fail(f"missing tensor '{name}' required by architecture '{a}'")
            continue
        if t.shape != shape:
            c.fail(f"tensor '{name}' has shape {list(t.shape)} but the hyper-parameters imply {list(shape)}")
        if t.type_name in _NOT_WEIGHTS or (len(shape) == 1 and t.type_name not in _FLOAT_TYPES):
            c.fail(f"tensor '{name}' has type {t.type_name}, which llama.cpp cannot compute with here")
    extra = sorted(set(present) - set(spec))
    if extra:
        c.fail(f"tensor '{extra[0]}' is not used by llama.cpp's '{a}' loader (it would refuse the file)")


def _check_tokenizer(c: _Cursor, info: GGUFInfo) -> None:
    """What llama.cpp's vocabulary loader needs; duplicate tokens make it abort (GGML_ASSERT)."""
    m = info.metadata
    model = m.get(_TK.MODEL)
    if model is None:
        c.fail(f"missing required key '{_TK.MODEL}'")
    if model not in TOKENIZER_MODELS:
        raise UnsupportedModelError(f"{c.name}: tokenizer model '{model}' is not one llama.cpp knows")
    if model in ("none", "no_vocab"):
        return
    tokens, types = c.tokens, c.token_types
    if tokens is None:
        c.fail(f"missing tokenizer vocabulary '{_TK.LIST}'")
    n = len(tokens)
    pre = m.get(_TK.PRE)
    if model in _BPE_MODELS:
        if _TK.MERGES not in m and pre != "kimi-k2":
            c.fail(f"BPE tokenizer without '{_TK.MERGES}'")
        if pre is not None and pre not in PRE_TOKENIZERS:
            raise UnsupportedModelError(f"{c.name}: pre-tokenizer '{pre}' is not one llama.cpp knows")
    for key in (_TK.TOKEN_TYPE, _TK.SCORES):
        if key in m and len(m[key]) != n:
            c.fail(f"'{key}' has {len(m[key]):,} entries but there are {n:,} tokens")
    for key in TOKEN_ID_KEYS:
        if key in m and m[key] >= n:
            c.fail(f"'{key}' = {m[key]:,} is not below the vocabulary size {n:,}")
    named = [s or b"[EMPTY_%d]" % i for i, s in enumerate(tokens)] if not all(tokens) else tokens
    if len(set(named)) != n:  # llama.cpp names empty tokens [EMPTY_i], then asserts the texts are unique
        seen: dict[bytes, int] = {}
        for i, s in enumerate(named):
            if s in seen:
                c.fail(f"tokenizer.ggml.tokens[{i}] {s[:40]!r} duplicates token {seen[s]}")
            seen[s] = i
    if types is not None and n and (min(types) < 0 or max(types) > 6):
        bad = next(i for i, t in enumerate(types) if not 0 <= t <= 6)
        c.fail(f"tokenizer.ggml.token_type[{bad}] = {types[bad]} is not a token type (0..6)")
    for i in (i for i, t in enumerate(types or ()) if t == 6):  # BYTE tokens are parsed as <0xHH>
        if not _BYTE_TOKEN.fullmatch(tokens[i]):
            c.fail(f"tokenizer.ggml.tokens[{i}] {tokens[i][:40]!r} has type BYTE but is not of the form <0xHH>")
    c.tokens = c.token_types = None
