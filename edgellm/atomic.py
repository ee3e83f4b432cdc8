"""Atomic artifact writes: write beside the destination, rename into place only when complete.

A Ctrl-C, a kill or a full disk then leaves the destination as it was (the temporary file is
removed on any exception; after a SIGKILL only a dot-prefixed `.NAME.partial-PID-*` can remain, and the
next write to the same destination removes it once process PID is gone).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(dest: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success it replaces `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = temp_prefix(dest, "partial")
    sweep_stale(dest, "partial")
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=prefix)) if directory else None
    if tmp is None:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=prefix)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _umask_mode(tmp, directory)
        if directory and dest.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def temp_prefix(dest: Path, kind: str) -> str:
    """`.NAME.KIND-PID-`: hidden beside the destination, and says which process owns it."""
    return f".{Path(dest).name}.{kind}-{os.getpid()}-"


def sweep_stale(dest: Path, kind: str) -> None:
    """Remove leftovers of `temp_prefix(dest, kind)` whose process has died (a SIGKILL skips cleanup)."""
    dest = Path(dest)
    for p in dest.parent.glob(f".{glob.escape(dest.name)}.{kind}-*-*"):
        pid = p.name[len(f".{dest.name}.{kind}-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) paths; give the artifact normal permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


def write_atomic(dest: Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
