"""KV-cache reuse across conversations (in memory) and across processes (on disk).

The state files are edgellm's own format (no library covers "a llama.cpp sequence state plus the
exact tokens it encodes"): an 8-byte magic, a JSON header, the token ids, the backend's state bytes.
Everything is checked on read — model fingerprint, sizes, sha256 of tokens and payload — and a file
that fails any check is deleted and treated as absent, never trusted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm.atomic import atomic_path
from edgellm.errors import CacheError

MAGIC = b"EDGEKV01"
_MAX_HEADER = 1 << 16


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def tokens_hash(tokens: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype="<i4").tobytes()).hexdigest()


@dataclass
class SavedState:
    tokens: list[int]
    state: bytes
    source: str  # 'memory' | 'disk' | 'file'


class PrefixCache:
    """Saved sequence states in memory, bounded by bytes, least recently used evicted."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: Sequence[int], state: bytes) -> None:
        key = tuple(tokens)
        if len(state) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        self._entries[key] = state
        self.bytes += len(state)
        while self.bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= len(dropped)

    def discard(self, tokens: Sequence[int]) -> None:
        """Forget the state for `tokens` (the backend refused it)."""
        old = self._entries.pop(tuple(tokens), None)
        if old is not None:
            self.bytes -= len(old)

    def best(self, prompt: Sequence[int], better_than: int) -> tuple[SavedState, int] | None:
        """The entry sharing the longest prefix with `prompt`, if longer than `better_than`."""
        found, best_n = None, better_than
        for key in self._entries:
            if len(key) <= best_n:
                continue
            n = common_prefix(key, prompt)
            if n > best_n:
                found, best_n = key, n
        if found is None:
            return None
        self._entries.move_to_end(found)
        return SavedState(list(found), self._entries[found], "memory"), best_n


def write_state_file(path: Path, fingerprint: str, tokens: Sequence[int], state: bytes) -> None:
    tok = np.asarray(tokens, dtype="<i4").tobytes()
    header = json.dumps({
        "fingerprint": fingerprint, "n_tokens": len(tokens), "payload_bytes": len(state),
        "tokens_sha256": hashlib.sha256(tok).hexdigest(), "payload_sha256": hashlib.sha256(state).hexdigest(),
        "created": time.time(),
    }).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(header)) + header)
        f.write(tok)
        f.write(state)


def _read_header(f, size: int, fingerprint: str) -> tuple[dict, list[int]]:
    """Header and tokens of a state file; raises CacheError on anything unexpected."""
    head = f.read(12)
    if len(head) != 12 or head[:8] != MAGIC:
        raise CacheError("not an edgellm KV state file")
    (hlen,) = struct.unpack("<I", head[8:])
    if hlen > _MAX_HEADER:
        raise CacheError("KV state header is too large")
    try:
        meta = json.loads(f.read(hlen))
        n, payload = int(meta["n_tokens"]), int(meta["payload_bytes"])
    except (ValueError, KeyError, TypeError):
        raise CacheError("KV state header is corrupt") from None
    if meta.get("fingerprint") != fingerprint:
        raise CacheError("KV state was made by another model or runtime configuration")
    if n < 1 or payload < 0 or 12 + hlen + 4 * n + payload != size:
        raise CacheError("KV state file is truncated or has trailing data")
    tok = f.read(4 * n)
    if hashlib.sha256(tok).hexdigest() != meta.get("tokens_sha256"):
        raise CacheError("KV state tokens fail their checksum")
    return meta, np.frombuffer(tok, dtype="<i4").astype(int).tolist()


def _open_regular(path: Path):
    """(file, size) for a regular file; CacheError for anything else. O_NONBLOCK: opening a FIFO that
    has the name of a state file must not wait for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CacheError(f"cannot read KV state {path}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CacheError(f"KV state {path} is not a regular file")
    return os.fdopen(fd, "rb"), st.st_size


def read_state_file(path: Path, fingerprint: str) -> SavedState:
    """Read and fully verify a state file (CacheError if it is unusable)."""
    f, size = _open_regular(Path(path))
    try:
        with f:
            meta, tokens = _read_header(f, size, fingerprint)
            state = f.read(int(meta["payload_bytes"]))
    except OSError as e:
        raise CacheError(f"cannot read KV state {path}: {e.strerror or e}") from None
    if hashlib.sha256(state).hexdigest() != meta.get("payload_sha256"):
        raise CacheError("KV state payload fails its checksum")
    return SavedState(tokens, state, "file")


class DiskCache:
    """States on disk keyed by (model fingerprint, token-prefix hash); survives restarts."""

    def __init__(self, root: Path, fingerprint: str, max_bytes: int = 1 << 30, min_tokens: int = 32) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._prefix = fingerprint[:16]
        self.rejected = 0  # corrupt or foreign entries found and removed

    def _path(self, tokens: Sequence[int]) -> Path:
        return self.root / f"{self._prefix}-{len(tokens):06d}-{tokens_hash(tokens)[:16]}.kv"

    def put(self, tokens: Sequence[int], state: bytes) -> Path | None:
        if len(tokens) < self.min_tokens:
            return None
        path = self._path(tokens)
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                os.utime(path)
            return path
        if path.exists() or path.is_symlink():  # a directory, FIFO or link squatting on the name
            self._discard(path)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_state_file(path, self.fingerprint, tokens, state)
        except OSError:
            return None  # a full or read-only disk must not break generation
        self._evict()
        return path

    def _entries(self) -> list[tuple[int, Path]]:
        """(token count, path) of this model's entries, longest first. Anything with an entry's name that
        is not a regular file (a directory, a FIFO, a link) is removed on sight: it was not written here."""
        out = []
        for p in self.root.glob(f"{self._prefix}-*.kv") if self.root.is_dir() else ():
            try:
                n = int(p.name.split("-")[1])
                regular = stat.S_ISREG(os.lstat(p).st_mode)
            except (IndexError, ValueError, OSError):
                continue
            if not regular:
                self._discard(p)
                continue
            out.append((n, p))
        return sorted(out, reverse=True)

    def _discard(self, path: Path) -> None:
        self.rejected += 1
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            pass  # not ours to fix: skipped either way

    def best(self, prompt: Sequence[int], better_than: int) -> tuple[SavedState, int] | None:
        """The entry sharing the longest prefix with `prompt` (if longer than `better_than`): headers are
        read longest entry first, until no remaining entry could share more than the best so far."""
        best: tuple[Path, int] | None = None
        floor = better_than
        for n, path in self._entries():
            if n <= floor:
                break
            try:
                f, size = _open_regular(path)
                with f:
                    _, tokens = _read_header(f, size, self.fingerprint)
            except (CacheError, OSError):
                self._discard(path)
                continue
            shared = common_prefix(tokens, prompt)
            if shared > floor:
                best, floor = (path, shared), shared
        if best is None:
            return None
        path, shared = best
        try:
            saved = read_state_file(path, self.fingerprint)
        except CacheError:
            self._discard(path)
            return None
        os.utime(path)
        saved.source = "disk"
        return saved, shared

    def discard(self, tokens: Sequence[int]) -> None:
        """Remove the entry for `tokens`: its checksums held but the backend refused its payload."""
        path = self._path(tokens)
        if path.exists() or path.is_symlink():
            self._discard(path)

    def _evict(self) -> None:
        files = []
        for _, p in self._entries():
            with contextlib.suppress(OSError):
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in files)
        for _, s, p in sorted(files):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= s
