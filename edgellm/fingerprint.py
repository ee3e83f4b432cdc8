"""Cheap content fingerprints of model files: what keys KV states, caches and decisions to a model.

Hashing a multi-GB file in full on every load would cost seconds; the fingerprint reads the file's
head (a GGUF header and tensor table, or a whole ONNX graph) in full and 16 evenly spaced 64 KiB
samples of the rest, plus the size. Any re-export or requantization changes the header or samples.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLES = 16
SAMPLE_BYTES = 65536


def sampled_digest(path: Path, head_bytes: int = 0, h: hashlib._Hash | None = None) -> hashlib._Hash:
    """Feed `path` into `h` (a new sha256 by default): its size, its first head_bytes, and samples."""
    h = h or hashlib.sha256()
    size = Path(path).stat().st_size
    h.update(f"{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(head_bytes))
        step = max(1, (size - head_bytes) // SAMPLES)
        for off in range(head_bytes, size, step):
            f.seek(off)
            h.update(f.read(SAMPLE_BYTES))
    return h


def gguf_fingerprint(path: Path, data_offset: int) -> str:
    """A GGUF file: header + tensor table in full (everything before `data_offset`), tensor data sampled."""
    return sampled_digest(path, data_offset).hexdigest()


def files_fingerprint(paths: list[Path], salt: str = "") -> str:
    """Several files (an ONNX graph and its external data), each by name and sampled content."""
    h = hashlib.sha256(salt.encode())
    for path in sorted(paths):
        h.update(f"{path.name}|".encode())
        sampled_digest(path, 0, h)
    return h.hexdigest()
