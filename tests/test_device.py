"""The device probe against recorded real devices, synthetic edge cases, and this machine."""
from __future__ import annotations

import json
import os
import platform
import sys
import types
from pathlib import Path

import pytest

from edgellm import device
from edgellm.device import parse_cpu_list, probe, probe_from, record_fixture

sys.path.insert(0, str(Path(__file__).parent))
from device_fixtures import FIXTURES, NAMES, RECORDED, load_fixture  # noqa: E402

GiB = 1 << 30


def test_rpi4():
    p = load_fixture("rpi4")
    assert (p.os, p.arch) == ("linux", "aarch64")
    assert p.board == "Raspberry Pi 4 Model B Rev 1.4"  # trailing NUL stripped
    assert p.soc == "bcm2711" and p.cpu_model == "4x Cortex-A72"
    assert "neon" in p.features and "asimd" in p.features
    assert "dotprod" not in p.features and "fp16" not in p.features
    assert (p.logical_cores, p.physical_cores, p.performance_cores, p.efficiency_cores) == (4, 4, 4, 0)
    assert 3.5 * GiB < p.ram_bytes < 4 * GiB and 0 < p.ram_available_bytes < p.ram_bytes
    assert not p.metal and not p.nnapi and p.android_sdk is None


def test_rpi5():
    p = load_fixture("rpi5")
    assert p.board == "Raspberry Pi 5 Model B Rev 1.0" and p.soc == "bcm2712"
    assert p.cpu_model == "4x Cortex-A76"
    assert {"neon", "asimd", "dotprod", "fp16"} <= set(p.features)
    assert "i8mm" not in p.features
    assert (p.physical_cores, p.performance_cores, p.efficiency_cores) == (4, 4, 0)
    assert 7.5 * GiB < p.ram_bytes <= 8 * GiB


def test_android_pixel():
    p = load_fixture("android-pixel")
    assert (p.os, p.arch) == ("android", "aarch64")
    assert p.android_sdk == 34 and p.nnapi
    assert p.board == "Google Pixel 7" and p.soc == "GS201" and p.gpu == "mali"
    assert p.cpu_model == "2x Cortex-X1 + 2x Cortex-A78 + 4x Cortex-A55"
    assert "dotprod" in p.features and "i8mm" not in p.features
    # capacities 1024 (X1) / 510 (A78) / 158 (A55): only the X1 pair is within 0.8 of the fastest
    assert (p.logical_cores, p.physical_cores) == (8, 8)
    assert (p.performance_cores, p.efficiency_cores) == (2, 6)


def test_x86_avx512():
    p = load_fixture("x86-avx512")
    assert (p.os, p.arch) == ("linux", "x86_64")
    assert p.cpu_model == "AMD Ryzen 9 7950X 16-Core Processor"
    assert {"sse3", "ssse3", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
            "avx512_vnni", "avx512_bf16"} <= set(p.features)
    assert "neon" not in p.features and "amx" not in p.features
    assert p.logical_cores == 32 and p.physical_cores == 16  # SMT siblings are not cores
    assert (p.performance_cores, p.efficiency_cores) == (16, 0)
    assert p.board is None and p.gpu is None


def test_mac_m2():
    p = load_fixture("mac-m2")
    assert (p.os, p.arch) == ("darwin", "aarch64")  # arm64 normalised
    assert p.cpu_model == "Apple M2 Pro" and p.board == "Mac14,12"
    assert (p.performance_cores, p.efficiency_cores, p.logical_cores) == (8, 4, 12)
    assert p.metal and p.gpu == "Apple M2 Pro GPU (Metal)"
    assert {"neon", "asimd", "dotprod", "i8mm", "bf16", "fp16"} <= set(p.features)
    assert p.ram_bytes == 32 * GiB


def test_recorded_x86_vm():
    """Recorded with edgellm.device.record_fixture on this project's 2-core x86-64 VM (not hand-written)."""
    p = load_fixture("x86-vm-recorded")
    assert (p.os, p.arch, p.cpu_model) == ("linux", "x86_64", "Intel(R) Xeon(R) Processor")
    assert {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx", "fma"} <= set(p.features)
    assert (p.logical_cores, p.physical_cores, p.performance_cores, p.efficiency_cores) == (2, 2, 2, 0)
    assert p.ram_bytes == 24683772 * 1024 and 0 < p.ram_available_bytes < p.ram_bytes
    assert p.board is None and p.gpu is None and not p.metal and not p.nnapi
    # what record_fixture copied is what the probe reads, and nothing the probe does not use
    files = {str(f.relative_to(FIXTURES / "x86-vm-recorded")) for f in (FIXTURES / "x86-vm-recorded").rglob("*")
             if f.is_file()}
    assert {"proc/cpuinfo", "proc/meminfo", "uname.txt"} <= files
    assert all(f.startswith(("proc/", "sys/devices/", "uname.txt")) for f in files), files


def test_fixture_readme_says_which_fixtures_are_recorded():
    readme = (FIXTURES / "README.md").read_text()
    for name in NAMES:
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        assert ("recorded" if name in RECORDED else "hand-written") in row, row


@pytest.mark.parametrize("name", NAMES)
def test_profile_is_json_ready_and_sorted(name):
    p = load_fixture(name)
    assert list(p.features) == sorted(p.features)
    assert json.loads(json.dumps(p.to_dict()))["features"] == list(p.features)


def _write(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


def test_intel_hybrid_uses_core_and_atom_lists(tmp_path):
    # i7-1260P-like: 4 P-cores with hyper-threads (cpu0-7), 8 E-cores (cpu8-15), all at the same max freq
    for i in range(16):
        core = i // 2 if i < 8 else i - 4
        sib = f"{i & ~1}-{i | 1}" if i < 8 else str(i)
        _write(tmp_path, f"sys/devices/system/cpu/cpu{i}/topology/core_id", f"{core}\n")
        _write(tmp_path, f"sys/devices/system/cpu/cpu{i}/topology/physical_package_id", "0\n")
        _write(tmp_path, f"sys/devices/system/cpu/cpu{i}/topology/thread_siblings_list", f"{sib}\n")
        _write(tmp_path, f"sys/devices/system/cpu/cpu{i}/cpufreq/cpuinfo_max_freq", "4700000\n")
    _write(tmp_path, "sys/devices/cpu_core/cpus", "0-7\n")
    _write(tmp_path, "sys/devices/cpu_atom/cpus", "8-15\n")
    p = probe_from(tmp_path, system="Linux", machine="x86_64")
    assert (p.logical_cores, p.physical_cores, p.performance_cores, p.efficiency_cores) == (16, 12, 4, 8)


def test_android_from_build_prop_and_missing_files(tmp_path):
    _write(tmp_path, "system/build.prop", "# comment\nro.build.version.sdk=26\nro.product.model=Old Phone\n")
    p = probe_from(tmp_path, system="Linux", machine="armv7l")
    assert p.os == "android" and p.android_sdk == 26 and not p.nnapi
    assert p.arch == "armv7l" and p.logical_cores == 0 and p.ram_bytes == 0  # probe() fills cores in
    assert p.board == "Old Phone"


def test_cpu_list_format():
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("") == [] and parse_cpu_list(None) == []


def test_record_fixture_round_trip(tmp_path):
    src = FIXTURES / "rpi4"
    written = record_fixture(tmp_path, root=src)
    assert (tmp_path / "sys/devices/system/cpu/cpu3/cpufreq/cpuinfo_max_freq") in written
    assert "10000000a1b2c3d4" not in (tmp_path / "proc/cpuinfo").read_text()  # serial scrubbed
    again = probe_from(tmp_path, system="Linux", machine="aarch64")
    assert again == load_fixture("rpi4")


def test_live_probe_on_this_machine():
    p = probe()
    assert p is probe()  # cached
    assert p.logical_cores == os.cpu_count()
    assert p.ram_bytes > 0 and p.physical_cores >= 1 and p.performance_cores >= 1
    assert p.arch == {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine().lower(), platform.machine())
    assert p.os == platform.system().lower()


def test_llama_build_info_without_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import raises ImportError
    info = device.llama_build_info()
    assert info["available"] is False and "llama_cpp" in info["reason"]


def test_llama_build_info_parses_system_info(monkeypatch):
    fake = types.SimpleNamespace(
        __version__="0.3.16",
        llama_print_system_info=lambda: b"CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 0 | LLAMAFILE = 1 | ",
        llama_supports_gpu_offload=lambda: False,
    )
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    info = device.llama_build_info()
    assert info["version"] == "0.3.16" and info["gpu_offload"] is False
    assert info["features"] == {"SSE3": True, "AVX": True, "AVX2": True, "AVX512": False, "LLAMAFILE": True}
    assert info["raw"].startswith("CPU :")
