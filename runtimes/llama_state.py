"""llama.cpp sequence states re-framed between stream counts (the one-stream form is what is stored).

Hand-written: llama.cpp has no API to re-frame a state for a context with another stream count.
"""
from __future__ import annotations

import ctypes
import struct

from edgellm.errors import BackendError

# llama.cpp's sequence state: u32 magic, i32 sequence id, u32 stream count (the context's), then per
# stream a u32 cell count followed, for the one stream holding the sequence, by its cells. llama.cpp
# refuses a state whose stream count differs from the context's, so a state saved by a one-sequence
# session (`cache-prompt`, the disk cache) would not restore into a server slot. The cells do not depend
# on the stream count: states are kept in the one-stream form and re-framed for the context on restore.
_SEQ_HEAD = struct.Struct("<IiI")


def one_stream(buf: bytearray) -> bytearray:
    """A sequence state from a context of any stream count, in the one-stream form (in place)."""
    magic, seq, n = _SEQ_HEAD.unpack_from(buf)
    if n == 1:
        return buf
    empty_before = 0  # streams before the sequence's own are empty: one zero count each
    while empty_before < n and struct.unpack_from("<I", buf, _SEQ_HEAD.size + 4 * empty_before)[0] == 0:
        empty_before += 1
    if empty_before == n:  # the sequence holds no cells
        return bytearray(_SEQ_HEAD.pack(magic, seq, 1) + bytes(4))
    after = 4 * (n - 1 - empty_before)  # and so are the streams after it
    if after and any(memoryview(buf)[len(buf) - after:]):
        raise BackendError("unexpected llama.cpp sequence state layout (cells in several streams)")
    del buf[len(buf) - after:]
    del buf[_SEQ_HEAD.size:_SEQ_HEAD.size + 4 * empty_before]
    _SEQ_HEAD.pack_into(buf, 0, magic, seq, 1)
    return buf


def for_streams(data: bytes, n_stream: int):
    """A ctypes buffer holding `data` (a sequence state) framed for a context of `n_stream` streams."""
    if len(data) < _SEQ_HEAD.size + 4:
        raise BackendError("the saved KV state is truncated")
    try:
        return _framed(data, n_stream)
    except struct.error:
        raise BackendError("the saved KV state is malformed") from None


def _framed(data: bytes, n_stream: int):
    n = _SEQ_HEAD.unpack_from(data)[2]
    if n == n_stream:
        return (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    if n != 1:
        data = one_stream(bytearray(data))
    body = memoryview(data)[_SEQ_HEAD.size:]
    out = (ctypes.c_uint8 * (_SEQ_HEAD.size + len(body) + 4 * (n_stream - 1)))()  # zeroed: empty streams
    magic, seq, _ = _SEQ_HEAD.unpack_from(data)
    _SEQ_HEAD.pack_into(out, 0, magic, seq, n_stream)
    memoryview(out).cast("B")[_SEQ_HEAD.size:_SEQ_HEAD.size + len(body)] = body
    return out
