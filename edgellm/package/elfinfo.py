"""What an app's native libraries are, read with pyelftools: architecture, the libraries each needs,
the symbols it exports or lacks, and its segment alignment (16 KB for Android 15's 16 KB pages)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PackagingError

MACHINES = {"EM_AARCH64": "aarch64", "EM_X86_64": "x86_64", "EM_ARM": "arm", "EM_386": "x86"}
ABI_MACHINE = {"arm64-v8a": "aarch64", "x86_64": "x86_64", "armeabi-v7a": "arm", "x86": "x86"}
# libraries every Android device has at these names (the NDK's stable system libraries)
NDK_STABLE = frozenset({"libc.so", "libm.so", "libdl.so", "liblog.so", "libandroid.so", "libjnigraphics.so",
                        "libz.so", "libEGL.so", "libGLESv2.so", "libGLESv3.so", "libvulkan.so", "libOpenSLES.so",
                        "libaaudio.so", "libmediandk.so", "libneuralnetworks.so", "libnativewindow.so",
                        "libsync.so", "libcamera2ndk.so", "libbinder_ndk.so", "libstdc++.so"})


@dataclass(frozen=True)
class ElfInfo:
    path: str
    machine: str
    soname: str | None
    needed: tuple[str, ...]
    load_align: int          # the smallest p_align of its PT_LOAD segments
    exports: frozenset[str]  # defined global/weak dynamic symbols
    undefined: frozenset[str]

    def page_ok(self, page: int = 16384) -> bool:
        return self.load_align >= page


def read(path: Path) -> ElfInfo:
    from elftools.common.exceptions import ELFError
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            machine = MACHINES.get(elf["e_machine"], elf["e_machine"])
            aligns = [seg["p_align"] for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
            needed, soname = [], None
            for sec in elf.iter_sections():
                if isinstance(sec, DynamicSection):
                    for tag in sec.iter_tags():
                        if tag.entry.d_tag == "DT_NEEDED":
                            needed.append(tag.needed)
                        elif tag.entry.d_tag == "DT_SONAME":
                            soname = tag.soname
            exports, undefined = set(), set()
            table = elf.get_section_by_name(".dynsym") or elf.get_section_by_name(".symtab")
            for sym in table.iter_symbols() if table is not None else ():
                if not sym.name or sym["st_info"]["bind"] not in ("STB_GLOBAL", "STB_WEAK"):
                    continue
                (undefined if sym["st_shndx"] == "SHN_UNDEF" else exports).add(sym.name)
    except (OSError, ELFError) as e:
        raise PackagingError(f"{path}: not a readable ELF file ({e})") from None
    return ElfInfo(str(path), machine, soname, tuple(needed), min(aligns) if aligns else 0,
                   frozenset(exports), frozenset(undefined))
