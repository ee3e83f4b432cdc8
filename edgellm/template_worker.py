"""Chat templates render in a child process with a deadline and a memory cap.

A template is code that comes with an untrusted model file. Jinja's sandbox stops it from reaching
Python internals, but not from looping for hours (`range` nests) or from building a string of many
gigabytes (`~` in a loop doubles one in C, where nothing can be checked). A thread cannot be stopped
from outside and a C-level allocation cannot be interrupted, so rendering happens in a small child
process: it has an address-space limit (RLIMIT_AS), and the parent kills it when the deadline passes
and starts a new one on the next render. The child is spawned fresh (no fork of a process holding
llama.cpp threads) and only imports jinja2; it exits when the parent closes its stdin.

Wire format (hand-written: four lines of framing, no library needed): each message is a 4-byte
little-endian length followed by that much UTF-8 JSON.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

from .errors import TemplateError

DEFAULT_DEADLINE_S = 2.0  # EDGELLM_TEMPLATE_TIMEOUT overrides; a ChatML render takes ~0.1 ms
MEMORY_LIMIT_BYTES = 1 << 30  # the child's address space (Python + jinja2 need ~60 MB of it)
STARTUP_TIMEOUT_S = 120.0  # the child's own start, apart from render deadlines
MAX_OUTPUT_CHARS = 64 << 20  # a rendered prompt larger than this cannot fit any context anyway
_HEAD = struct.Struct("<I")


def deadline_s() -> float:
    raw = os.environ.get("EDGELLM_TEMPLATE_TIMEOUT", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_DEADLINE_S
    except ValueError:
        value = DEFAULT_DEADLINE_S
    return value if value > 0 else DEFAULT_DEADLINE_S


# -- the child -------------------------------------------------------------------------------------
def _child_main() -> None:
    """Serve render requests on stdin/stdout until stdin closes."""
    try:
        import resource

        # on top of what the interpreter already maps: under an emulator (qemu-user on an emulated Pi) the
        # process's address space starts with the emulator's own reservations, over a GiB of them
        limit = _mapped_bytes() + MEMORY_LIMIT_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        # a backstop for a child whose parent died mid-render (see _die_with_parent): an hour of CPU in all
        resource.setrlimit(resource.RLIMIT_CPU, (3600, 3600))
    except (ImportError, ValueError, OSError):  # pragma: no cover - no rlimits on this platform
        pass
    _die_with_parent()
    from .template_sandbox import render_in_process

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(_HEAD.pack(0))  # ready: the parent's render deadlines start after the imports
    stdout.flush()
    while True:
        head = stdin.read(_HEAD.size)
        if len(head) < _HEAD.size:
            return
        request = json.loads(stdin.read(_HEAD.unpack(head)[0]))
        try:
            text = render_in_process(**request)
            reply: dict[str, Any] = ({"text": text} if len(text) <= MAX_OUTPUT_CHARS else
                                     {"error": f"chat template output is larger than {MAX_OUTPUT_CHARS >> 20} M "
                                               "characters"})
        except TemplateError as e:
            reply = {"error": str(e)}
        except MemoryError:
            reply = {"error": f"chat template needed more than {MEMORY_LIMIT_BYTES >> 20} MiB of memory"}
        except RecursionError:
            reply = {"error": "chat template recursed too deeply"}
        data = json.dumps(reply).encode()  # ASCII: lone surrogates travel as \\u escapes
        stdout.write(_HEAD.pack(len(data)) + data)
        stdout.flush()


def _mapped_bytes() -> int:
    """This process's virtual size (Linux /proc/self/status VmSize), 0 where unknown."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _die_with_parent() -> None:
    """Linux: the kernel kills this child when its parent dies, even in the middle of a runaway render (the
    parent normally kills it at the deadline; a parent killed with SIGKILL cannot)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent was already gone before prctl
            os._exit(0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        pass


# -- the parent ------------------------------------------------------------------------------------
class TemplateWorker:
    """The parent's handle on the render child: one render at a time, results memoised (LRU)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._memo: OrderedDict[str, str] = OrderedDict()
        self.restarts = 0  # children killed at the deadline (or found dead)
        self._ready = False

    def start(self) -> None:
        """Start the child now (it imports jinja2 while the caller loads a model)."""
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from edgellm.template_worker import _child_main; _child_main()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                close_fds=True)
            self._ready = False

    def _ensure(self) -> subprocess.Popen[bytes]:
        self._spawn()
        if not self._ready:
            # the child's start-up (Python, jinja2: ~0.1 s here, many seconds on an emulated or busy board) is
            # not part of any render's deadline; it has a deadline of its own
            try:
                ready = self._read(self._proc, STARTUP_TIMEOUT_S, framed=False)
            except (BrokenPipeError, OSError):
                ready = None
            if ready is None:
                self._kill()
                raise TemplateError(f"the chat template's render process did not start within {STARTUP_TIMEOUT_S:g} s")
            self._ready = True
        return self._proc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()

    def close(self) -> None:
        with self._lock:
            self._kill()

    def render(self, request: dict[str, Any], timeout: float) -> str:
        key = json.dumps(request, sort_keys=True)
        with self._lock:
            hit = self._memo.get(key)
            if hit is not None:
                self._memo.move_to_end(key)
                return hit
            text = self._ask(key.encode(), timeout)
            self._memo[key] = text
            if len(self._memo) > 64:
                self._memo.popitem(last=False)
            return text

    def _ask(self, data: bytes, timeout: float) -> str:
        proc = self._ensure()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(_HEAD.pack(len(data)) + data)
            proc.stdin.flush()
            reply = self._read(proc, timeout)
        except (BrokenPipeError, OSError, ValueError):
            self._kill()
            self.restarts += 1
            raise TemplateError("the chat template's render process died (memory limit?)") from None
        if reply is None:
            self._kill()
            self.restarts += 1
            raise TemplateError(f"chat template did not finish rendering within {timeout:g} s: refused "
                                "(EDGELLM_TEMPLATE_TIMEOUT sets the limit)")
        if "error" in reply:
            raise TemplateError(reply["error"])
        return reply["text"]

    @staticmethod
    def _read(proc: subprocess.Popen[bytes], timeout: float, framed: bool = True) -> dict[str, Any] | None:
        """The child's reply, or None when the deadline passes first (framed=False: its empty ready message)."""
        assert proc.stdout is not None
        fd, end, buf, need = proc.stdout.fileno(), time.monotonic() + timeout, b"", _HEAD.size
        while len(buf) < need:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, max(65536, need - len(buf)))
            if not chunk:
                raise BrokenPipeError
            buf += chunk
            if need == _HEAD.size and len(buf) >= _HEAD.size:
                need += _HEAD.unpack(buf[:_HEAD.size])[0]
        return json.loads(buf[_HEAD.size:need]) if framed or need > _HEAD.size else {}


_worker: TemplateWorker | None = None
_worker_lock = threading.Lock()


def worker() -> TemplateWorker:
    """The process-wide render worker (started on first use, stopped at exit)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = TemplateWorker()
            atexit.register(_worker.close)
        return _worker
