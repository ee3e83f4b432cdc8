"""What a validated GGUF header holds (GGUFInfo, TensorInfo), and the bounded reader both the format
checks (edgellm.gguf_check) and the llama.cpp rules (edgellm.gguf_rules) read it with (Cursor)."""
from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NoReturn

import gguf

from edgellm.errors import InvalidModelError

MAX_STRING = 16 << 20          # one metadata string (chat templates, HF tokenizer JSON fit easily)
_CHUNK = 1 << 20
_U64 = struct.Struct("<Q")
_TK = gguf.Keys.Tokenizer


def quote(v: Any) -> str:
    """A value quoted for a one-line message, cut short."""
    r = repr(v)
    return r if len(r) <= 60 else r[:56] + "...'"


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


class Cursor:
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
            self.fail(f"{what} at offset {off:,} needs {n:,} bytes "
                      f"but the file ends at {self.size:,} bytes (truncated)")
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
            self.fail(f"{what} length {n:,} at offset {self.tell() - 8:,} "
                      f"runs past the end of the file ({self.size:,} bytes)")
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
            self.fail(f"{what} ({n:,} bytes at offset {self.tell():,}) "
                      f"runs past the end of the file ({self.size:,} bytes)")
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
