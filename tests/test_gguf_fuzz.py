"""Fuzz the GGUF validator with mutants of the real model, and hold it to llama.cpp's loader.

Every mutant must be rejected with an edgellm error or accepted; any other exception fails the test.
Accepted mutants that differ from the original are written out (mutant header + the original tensor
data) and loaded by llama.cpp in a persistent worker process: a crash, hang or load failure there is a
finding (the validator accepted something llama.cpp cannot use), so the test fails naming the mutant.
Seeded and bounded: EDGELLM_FUZZ_MUTANTS (default 300) mutants from EDGELLM_FUZZ_SEED (default 0).
"""
from __future__ import annotations

import os
import random
import re
import select
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
import pytest

from edgellm.errors import EdgeLLMError
from edgellm.gguf_check import validate_gguf, validate_gguf_stream

N_MUTANTS = int(os.environ.get("EDGELLM_FUZZ_MUTANTS", "300"))
SEED = int(os.environ.get("EDGELLM_FUZZ_SEED", "0"))
LOAD_TIMEOUT_S = 120
SLOW_S = 2.0

WORKER = r"""
import collections, ctypes, sys
import llama_cpp
errors = collections.deque(maxlen=3)
@llama_cpp.llama_log_callback
def _log(level, text, user_data):
    if level == 4 and text:  # GGML_LOG_LEVEL_ERROR
        errors.append(text.decode("utf-8", "replace").strip())
llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_default_params()
params.n_gpu_layers = 0
params.use_mmap = True
params.vocab_only = False
print("@@ready", flush=True)
for line in sys.stdin:
    errors.clear()
    model = llama_cpp.llama_model_load_from_file(line.rstrip("\n").encode(), params)
    if model:
        llama_cpp.llama_model_free(model)
        print("@@ok", flush=True)
    else:
        print("@@fail " + " | ".join(errors).replace("\n", " "), flush=True)
"""


@dataclass
class Field:
    offset: int
    size: int
    kind: str


def header_fields(h: bytes) -> tuple[list[Field], int]:
    """Positions of every length, count, type, dim and offset field in a trusted header; and its end."""
    fields: list[Field] = [Field(8, 8, "count"), Field(16, 8, "count")]
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", h, 8)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(kind: str) -> None:
        nonlocal pos
        fields.append(Field(pos, 8, kind))
        pos += 8 + struct.unpack_from("<Q", h, pos)[0]

    for _ in range(n_kv):
        string("key_len")
        vt = struct.unpack_from("<I", h, pos)[0]
        fields.append(Field(pos, 4, "value_type"))
        pos += 4
        if vt == 9:
            et, n = struct.unpack_from("<IQ", h, pos)
            fields += [Field(pos, 4, "elem_type"), Field(pos + 4, 8, "array_len")]
            pos += 12
            for _ in range(n):
                if et == 8:
                    string("elem_len")
                else:
                    fields.append(Field(pos, sizes[et], "elem_value"))
                    pos += sizes[et]
        elif vt == 8:
            string("str_len")
        else:
            fields.append(Field(pos, sizes[vt], "scalar"))
            pos += sizes[vt]
    for _ in range(n_tensors):
        string("tensor_name_len")
        nd = struct.unpack_from("<I", h, pos)[0]
        fields.append(Field(pos, 4, "n_dims"))
        pos += 4
        fields += [Field(pos + 8 * i, 8, "dim") for i in range(nd)]
        pos += 8 * nd
        fields += [Field(pos, 4, "tensor_type"), Field(pos + 4, 8, "tensor_offset")]
        pos += 12
    return fields, pos


@dataclass
class Mutant:
    head: bytes        # replaces the original bytes before the data section
    tail_len: int      # how many bytes of the original data section follow it
    what: str


def known_keys(arch: str = "llama") -> dict[int, list[bytes]]:
    """Every metadata key gguf knows, by length: renaming a key to one of these keeps the layout."""
    out: dict[int, list[bytes]] = {}
    stack = [gguf.Keys]
    while stack:
        for v in vars(stack.pop()).values():
            if isinstance(v, type):
                stack.append(v)
            elif isinstance(v, str) and "{" not in v.replace("{arch}", ""):
                k = v.format(arch=arch).encode()
                out.setdefault(len(k), []).append(k)
    return out


class Mutator:
    """Byte flips, field-targeted value changes, key renames, truncations, insertions and deletions."""

    def __init__(self, header: bytes, data_len: int, seed: int) -> None:
        self.h, self.data_len, self.rng = header, data_len, random.Random(seed)
        self.fields, self.header_end = header_fields(header)
        self.by_kind: dict[str, list[Field]] = {}
        for f in self.fields:
            self.by_kind.setdefault(f.kind, []).append(f)
        self.table_start = self.by_kind["tensor_name_len"][0].offset
        self.keys = known_keys()

    def value_for(self, f: Field) -> int:
        r, bits = self.rng, 8 * f.size
        v = int.from_bytes(self.h[f.offset:f.offset + f.size], "little")
        same = self.by_kind[f.kind]
        other = same[r.randrange(len(same))]
        choices = [0, 1, 2, 3, v + 1, v - 1, v * 2, v // 2, v + 32, v - 32, (1 << bits) - 1, 1 << (bits - 1),
                   v ^ (1 << r.randrange(bits)), r.getrandbits(bits), r.randrange(64), 1 << 32, 1 << 40,
                   int.from_bytes(self.h[other.offset:other.offset + f.size], "little")]
        return choices[r.randrange(len(choices))] % (1 << bits)

    def next(self) -> Mutant:
        r, h, full = self.rng, bytearray(self.h), self.data_len
        op = r.choices(["field", "rename", "flip", "table_flip", "truncate", "insert", "delete"],
                       [35, 10, 15, 10, 10, 10, 10])[0]
        if op == "rename":
            f = r.choice(self.by_kind["key_len"])
            n = int.from_bytes(self.h[f.offset:f.offset + 8], "little")
            new = r.choice(self.keys.get(n, [self.h[f.offset + 8:f.offset + 8 + n]]))
            h[f.offset + 8:f.offset + 8 + n] = new
            return Mutant(bytes(h), full, f"rename@{f.offset}={new.decode()}")
        if op == "field":
            kind = r.choice(sorted(self.by_kind))
            f = r.choice(self.by_kind[kind])
            v = self.value_for(f)
            h[f.offset:f.offset + f.size] = v.to_bytes(f.size, "little")
            return Mutant(bytes(h), full, f"{kind}@{f.offset}={v}")
        if op in ("flip", "table_flip"):
            lo = self.table_start if op == "table_flip" else 0
            i = r.randrange(lo, self.header_end)
            h[i] = h[i] ^ (1 << r.randrange(8)) if r.random() < 0.7 else r.randrange(256)
            return Mutant(bytes(h), full, f"{op}@{i}={h[i]}")
        if op == "truncate":
            cut = r.choice([r.randrange(len(h)), r.randrange(len(h), len(h) + full), r.randrange(0, 64)])
            if cut <= len(h):
                return Mutant(bytes(h[:cut]), 0, f"truncate@{cut}")
            return Mutant(bytes(h), cut - len(h), f"truncate@{cut}")
        i = r.randrange(len(h))
        n = r.choice([1, 2, 4, 8, 32, r.randrange(1, 200)])
        if op == "insert":
            h[i:i] = r.randbytes(n) if r.random() < 0.5 else h[i:i + n]
        else:
            del h[i:i + n]
        return Mutant(bytes(h), full, f"{op}@{i}+{n}")


class _Chain:
    """A stream of mutant head + original data section, without copying the 98 MB each time."""

    def __init__(self, head: bytes, data: BinaryIO, data_offset: int, tail_len: int) -> None:
        self.head, self.f, self.data_offset, self.tail_len, self.pos = head, data, data_offset, tail_len, 0

    def read(self, n: int = -1) -> bytes:
        total = len(self.head) + self.tail_len
        n = total - self.pos if n < 0 else min(n, total - self.pos)
        out = b""
        if self.pos < len(self.head):
            out = self.head[self.pos:self.pos + n]
        if len(out) < n:
            self.f.seek(self.data_offset + self.pos + len(out) - len(self.head))
            out += self.f.read(n - len(out))
        self.pos += len(out)
        return out


class MutantFile:
    """One on-disk mutant, rewritten in place: only the header is rewritten when the layout is unchanged."""

    def __init__(self, path: Path, original: Path, data_offset: int) -> None:
        self.path, self.original, self.data_offset = path, original, data_offset
        self.layout: tuple[int, int] | None = None

    def write(self, m: Mutant) -> None:
        if self.layout == (len(m.head), m.tail_len):
            with open(self.path, "r+b") as f:
                f.write(m.head)
            return
        with open(self.path, "wb") as out, open(self.original, "rb") as src:
            out.write(m.head)
            src.seek(self.data_offset)
            left = m.tail_len
            while left:
                sent = os.sendfile(out.fileno(), src.fileno(), self.data_offset + m.tail_len - left, left)
                if sent == 0:
                    break
                left -= sent
        self.layout = (len(m.head), m.tail_len)


class Worker:
    """llama.cpp in a separate process, so a native crash is observed instead of taking pytest down."""

    def __init__(self, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.err = open(self.stderr_path, "wb")
        env = dict(os.environ, GGML_NO_BACKTRACE="1")  # an abort must not attach gdb to the worker
        self.pending = b""
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=env)
        assert self._line(60) == "ready", "llama.cpp worker did not start"

    def _line(self, timeout: float) -> str | None:
        """The worker's next '@@' reply; '' if it died, None if it hung (stray native output is skipped)."""
        deadline, fd = time.monotonic() + timeout, self.proc.stdout.fileno()
        while True:
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                if line.startswith(b"@@"):
                    return line[2:].decode("utf-8", "replace")
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return ""
            self.pending += chunk

    def load(self, path: Path) -> str:
        """'ok', 'fail <llama.cpp error>', 'crash <signal/stderr>' or 'hang'."""
        if self.proc is None:
            self.start()
        try:
            self.proc.stdin.write(f"{path}\n".encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._line(LOAD_TIMEOUT_S)
        if line:
            return line
        self.proc.kill()
        rc = self.proc.wait()
        self.err.close()
        tail = self.stderr_path.read_bytes()[-300:].decode("utf-8", "replace").replace("\n", " | ")
        self.proc = None
        return "hang" if line is None else f"crash rc={rc} {tail}"

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.err.close()


def test_fuzz_gguf_header(default_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    original = validate_gguf(default_model_path)
    size, data_offset = original.file_size, original.data_offset
    with open(default_model_path, "rb") as f:
        header = f.read(data_offset)
    mutator = Mutator(header, size - data_offset, SEED)
    target = MutantFile(tmp_path / "mutant.gguf", Path(default_model_path), data_offset)
    worker = Worker(tmp_path / "worker.stderr")
    assert worker.load(Path(default_model_path)) == "ok", "llama.cpp cannot load the original model"
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    findings: list[str] = []
    start = time.perf_counter()
    with open(default_model_path, "rb") as data:
        try:
            for i in range(N_MUTANTS):
                m = mutator.next()
                stream = _Chain(m.head, data, data_offset, m.tail_len)
                t0 = time.perf_counter()
                try:
                    validate_gguf_stream(stream, len(m.head) + m.tail_len, f"mutant{i}")
                except EdgeLLMError as e:
                    counts["rejected"] += 1
                    reasons[re.sub(r"'[^']*'|[\d,]+", "_", str(e).split(": ", 1)[-1])[:60]] += 1
                    continue
                except Exception as e:  # noqa: BLE001 - anything else is a validator bug
                    findings.append(f"mutant {i} ({m.what}): validator raised {type(e).__name__}: {e}")
                    counts["crashed-validator"] += 1
                    continue
                finally:
                    if time.perf_counter() - t0 > SLOW_S:  # work must stay O(header bytes)
                        findings.append(f"mutant {i} ({m.what}): validation took {time.perf_counter() - t0:.1f} s")
                counts["accepted"] += 1
                if m.head == header and m.tail_len == size - data_offset:
                    counts["identical"] += 1
                    continue
                target.write(m)
                result = worker.load(target.path)
                counts["loaded" if result == "ok" else result.split()[0]] += 1
                if result != "ok":
                    findings.append(f"mutant {i} ({m.what}): accepted but llama.cpp says {result}")
        finally:
            worker.close()
    wall = time.perf_counter() - start
    with capsys.disabled():
        _report(counts, reasons, wall)
    assert not findings, "\n".join(findings[:30])


def _report(counts: Counter, reasons: Counter, wall: float) -> None:
    print(f"\nGGUF fuzz: {N_MUTANTS} mutants, rejected {counts['rejected']}, accepted {counts['accepted']} "
          f"({counts['identical']} identical), loaded {counts['loaded']}, load failures {counts['fail']}, "
          f"crashes {counts['crash']}, hangs {counts['hang']}, validator errors {counts['crashed-validator']}, "
          f"{wall:.1f} s")
    for reason, n in reasons.most_common(12):
        print(f"  {n:6d}  {reason}")
