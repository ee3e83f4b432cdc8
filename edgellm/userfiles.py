"""Files a user names on the command line or in a chat command: regular files only, read with a size cap.

`open()` on a FIFO blocks until a writer appears, `/dev/zero` never ends, and a directory or a
read-only place fails with an OSError whose traceback tells a user nothing. Every such path gets one
clear line (UsageError) here, and the caller's work (a conversation, a loaded model) goes on.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UsageError

TEXT_LIMIT = 64 << 20  # calibration text, prompts, saved conversations


def read_bytes(path: str | os.PathLike[str], what: str = "file", limit: int = TEXT_LIMIT) -> bytes:
    """The content of a regular file of at most `limit` bytes; UsageError for anything else."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UsageError(f"cannot read the {what} {p}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"the {what} {p} is not a regular file")
        if st.st_size > limit:
            raise UsageError(f"the {what} {p} is {st.st_size:,} bytes; the limit is {limit:,}")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise UsageError(f"cannot read the {what} {p}: {e.strerror or e}") from None
    if len(data) > limit:  # it grew while we read it
        raise UsageError(f"the {what} {p} is larger than {limit:,} bytes")
    return data


def decode_text(data: bytes, what: str) -> str:
    """UTF-8 text, or a UsageError that says where the bad byte is."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"the {what} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def read_text(path: str | os.PathLike[str], what: str = "file", limit: int = TEXT_LIMIT) -> str:
    """A regular UTF-8 text file of at most `limit` bytes."""
    return decode_text(read_bytes(path, what, limit), f"{what} {path}")


def writable_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Check that `path` can be written as a regular file (it is one, or does not exist yet, in an
    existing directory), before any work is done for it."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if not p.parent.is_dir():
            raise UsageError(f"cannot write the {what} {p}: the directory {p.parent} does not exist") from None
        return p
    except OSError as e:
        raise UsageError(f"cannot write the {what} {p}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"cannot write the {what} {p}: it exists and is not a regular file")
    return p
