"""An APK's zip layout: entries written page-aligned, and read back to check it.

Android 15 on 16 KB-page devices maps uncompressed native libraries straight out of the APK, so each
`lib/<abi>/*.so` entry's data must start on a 16 KB boundary; uncompressed assets and resources.arsc
need 4 bytes. Debian's zipalign aligns libraries to 4 KB only (`-p`), and Python's zipfile has no
alignment at all, so the padding is written here by hand, the way zipalign does it: an extra field
with Android's alignment header id 0xD935 (2-byte id, 2-byte size, 2-byte alignment, zero bytes) in
the local file header, sized so the data after it lands on the boundary.
"""
from __future__ import annotations

import shutil
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

LIB_ALIGN = 16384        # native libraries: Android 15's 16 KB pages
DATA_ALIGN = 4           # other uncompressed entries (resources.arsc, assets)
_ALIGN_ID = 0xD935       # zipalign's extra field id
_EPOCH = (2008, 1, 1, 0, 0, 0)  # fixed timestamps: the same inputs give the same APK bytes


@dataclass(frozen=True)
class Entry:
    name: str
    source: Path | bytes     # a file (streamed) or the bytes themselves
    compress: bool


def alignment_for(name: str, compress: bool) -> int:
    if compress:
        return 1
    return LIB_ALIGN if name.startswith("lib/") and name.endswith(".so") else DATA_ALIGN


def write_aligned_zip(dest: Path, entries: Iterable[Entry]) -> None:
    """Write `entries` in order; every stored entry's data aligned as `alignment_for` says."""
    with zipfile.ZipFile(dest, "w", allowZip64=False) as z:
        for e in entries:
            size = len(e.source) if isinstance(e.source, bytes) else Path(e.source).stat().st_size
            info = zipfile.ZipInfo(e.name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED if e.compress else zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            info.file_size = size
            align = alignment_for(e.name, e.compress)
            if align > 1:
                offset = z.fp.tell() + 30 + len(e.name.encode("utf-8"))  # data offset with no extra field
                pad = (-(offset + 6)) % align                               # after a 6-byte minimum extra
                info.extra = struct.pack("<HHH", _ALIGN_ID, 2 + pad, align) + b"\0" * pad
            with z.open(info, "w") as out:
                if isinstance(e.source, bytes):
                    out.write(e.source)
                else:
                    with open(e.source, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)


@dataclass(frozen=True)
class EntryLayout:
    name: str
    data_offset: int
    compressed: bool
    size: int

    def aligned(self, boundary: int) -> bool:
        return self.data_offset % boundary == 0


def layout(apk: Path) -> list[EntryLayout]:
    """Where each entry's data starts in the file (read from the local headers, as a loader does)."""
    out = []
    with zipfile.ZipFile(apk) as z, open(apk, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset)
            head = f.read(30)
            if head[:4] != b"PK\x03\x04":
                raise ValueError(f"{apk}: no local header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            out.append(EntryLayout(info.filename, info.header_offset + 30 + name_len + extra_len,
                                   info.compress_type != zipfile.ZIP_STORED, info.file_size))
    return out


def misaligned(apk: Path) -> list[str]:
    """Stored entries whose data is not where Android needs it (empty when the APK is right)."""
    bad = []
    for e in layout(apk):
        if e.compressed:
            continue
        need = alignment_for(e.name, False)
        if not e.aligned(need):
            bad.append(f"{e.name} at {e.data_offset} (needs {need})")
    return bad
