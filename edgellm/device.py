"""The device probe: what this machine is, read once, as plain data.

Backend choice (edgellm.plan) is a pure function of the profile, so the probe is split in two:
`probe_from` parses a filesystem root plus sysctl/getprop dictionaries (testable with recorded fixtures
from real devices), and `probe` feeds it the live machine. Nothing here raises on a missing file: an
unknown value falls back to a safe default, because a probe that crashes blocks every command.
"""
from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Canonical feature names, as /proc/cpuinfo, sysctl or cpuid spell them -> edgellm's name.
_X86_FLAGS = {
    "pni": "sse3", "sse3": "sse3", "ssse3": "ssse3", "avx": "avx", "avx1.0": "avx", "avx2": "avx2",
    "fma": "fma", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
    "avx512_vnni": "avx512_vnni", "avx512vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16",
    "amx_tile": "amx", "amx_bf16": "amx", "amx_int8": "amx",
}
_ARM_FLAGS = {
    "neon": "neon", "asimd": "asimd", "asimddp": "dotprod", "asimdhp": "fp16", "i8mm": "i8mm",
    "sve": "sve", "sve2": "sve2", "bf16": "bf16",
}
_MAC_ARM_FLAGS = {
    "hw.optional.arm.FEAT_DotProd": "dotprod", "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.neon_fp16": "fp16", "hw.optional.AdvSIMD": "asimd", "hw.optional.neon": "neon",
    "hw.optional.arm.FEAT_SVE": "sve", "hw.optional.arm.FEAT_SVE2": "sve2",
}
# Arm Ltd. (implementer 0x41) part numbers -> core names, for a readable cpu_model on Arm boards.
_ARM_PARTS = {
    0xD03: "Cortex-A53", 0xD04: "Cortex-A35", 0xD05: "Cortex-A55", 0xD07: "Cortex-A57",
    0xD08: "Cortex-A72", 0xD09: "Cortex-A73", 0xD0A: "Cortex-A75", 0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1", 0xD0D: "Cortex-A77", 0xD40: "Neoverse-V1", 0xD41: "Cortex-A78",
    0xD44: "Cortex-X1", 0xD46: "Cortex-A510", 0xD47: "Cortex-A710", 0xD48: "Cortex-X2",
    0xD49: "Neoverse-N2", 0xD4D: "Cortex-A715", 0xD4E: "Cortex-X3", 0xD80: "Cortex-A520",
    0xD81: "Cortex-A720", 0xD82: "Cortex-X4",
}
_PERF_FRACTION = 0.8  # a core within 80 % of the fastest one's capacity counts as a performance core


@dataclass(frozen=True)
class DeviceProfile:
    """Everything backend choice needs to know about a device; built once by `probe`."""

    os: str  # 'linux' | 'android' | 'darwin' | 'windows'
    arch: str  # 'x86_64' | 'aarch64' | 'armv7l' | ...
    cpu_model: str
    features: tuple[str, ...]
    logical_cores: int
    physical_cores: int
    performance_cores: int
    efficiency_cores: int
    ram_bytes: int
    ram_available_bytes: int
    gpu: str | None = None
    metal: bool = False
    nnapi: bool = False
    android_sdk: int | None = None
    board: str | None = None
    soc: str | None = None
    busy_cores: int = 0  # cores other work kept busy when probed (Linux, /proc/stat): see plan._threads

    def to_dict(self) -> dict:
        """JSON-ready form (tuples become lists)."""
        d = asdict(self)
        d["features"] = list(self.features)
        return d


# ---------------------------------------------------------------- small parsers


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except (OSError, ValueError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def parse_cpu_list(text: str | None) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in (text or "").strip().split(","):
        if not part.strip():
            continue
        lo, _, hi = part.partition("-")
        try:
            cpus.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            continue
    return cpus


def parse_key_values(text: str, sep: str = ":") -> dict[str, str]:
    """Lines of 'key: value' (sysctl -a) or 'key=value' (build.prop); later keys win."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, found, value = line.partition(sep)
        if found and key.strip() and not key.lstrip().startswith("#"):
            out[key.strip()] = value.strip()
    return out


def parse_getprop(text: str) -> dict[str, str]:
    """Android `getprop` output: '[ro.build.version.sdk]: [34]' per line."""
    return dict(re.findall(r"^\[([^\]]+)\]:\s*\[(.*)\]\s*$", text, flags=re.M))


def _parse_cpuinfo(text: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Split /proc/cpuinfo into per-processor blocks and the trailing global fields (Arm boards)."""
    blocks: list[dict[str, str]] = []
    glob: dict[str, str] = {}
    for chunk in re.split(r"\n\s*\n", text):
        fields = {k.strip(): v.strip() for k, s, v in (ln.partition(":") for ln in chunk.splitlines()) if s}
        if "processor" in fields and fields["processor"].isdigit():
            blocks.append(fields)
        else:
            glob.update(fields)
    return blocks, glob


def _normalise_arch(machine: str) -> str:
    m = machine.strip().lower()
    return {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64", "i686": "x86", "i386": "x86"}.get(m, m)


def _arm_cpu_model(blocks: list[dict[str, str]]) -> str | None:
    """'4x Cortex-A72' or '2x Cortex-X1 + 2x Cortex-A78 + 4x Cortex-A55' from implementer/part fields."""
    names: list[str] = []
    for b in blocks:
        try:
            part, impl = int(b.get("CPU part", ""), 16), int(b.get("CPU implementer", ""), 16)
        except ValueError:
            return None
        names.append(_ARM_PARTS.get(part, f"Arm part {part:#x}") if impl == 0x41 else f"part {part:#x}")
    if not names:
        return None
    counts: dict[str, int] = {}
    for n in reversed(names):  # big cores sit at the high CPU numbers: list them first
        counts[n] = counts.get(n, 0) + 1
    return " + ".join(f"{c}x {n}" for n, c in counts.items())


# ---------------------------------------------------------------- topology


@dataclass
class _Cpu:
    index: int
    core_key: tuple
    speed: int | None  # cpu_capacity, else cpuinfo_max_freq


def _linux_cpus(root: Path, blocks: list[dict[str, str]]) -> list[_Cpu]:
    """One entry per logical CPU, from sysfs; falls back to cpuinfo's physical id/core id."""
    base = root / "sys/devices/system/cpu"
    indices = sorted(int(p.name[3:]) for p in base.glob("cpu[0-9]*") if p.name[3:].isdigit()) if base.is_dir() else []
    cpus: list[_Cpu] = []
    if indices:
        caps = {i: _read_int(base / f"cpu{i}/cpu_capacity") for i in indices}
        freqs = {i: _read_int(base / f"cpu{i}/cpufreq/cpuinfo_max_freq") for i in indices}
        speeds = caps if any(caps.values()) else freqs
        for i in indices:
            topo = base / f"cpu{i}/topology"
            core = _read_int(topo / "core_id")
            siblings = _read(topo / "thread_siblings_list")
            if core is None and siblings:  # no core_id: the sibling set names the core
                key: tuple = ("siblings", siblings.strip())
            else:
                key = (_read_int(topo / "physical_package_id"), _read_int(topo / "cluster_id"),
                       core if core is not None else i)
            cpus.append(_Cpu(i, key, speeds.get(i)))
        return cpus
    for _n, b in enumerate(blocks):
        i = int(b["processor"])
        key = (b["physical id"], b["core id"]) if "core id" in b else (None, i)
        mhz = b.get("cpu MHz")
        cpus.append(_Cpu(i, key, None if mhz is None else int(float(mhz))))
    return cpus


def _core_split(root: Path, cpus: list[_Cpu]) -> tuple[int, int]:
    """(performance, efficiency) physical cores: Intel hybrid lists first, else the 0.8 x fastest rule."""
    cores: dict[tuple, _Cpu] = {}
    for c in cpus:
        cores.setdefault(c.core_key, c)
    if not cores:
        return 0, 0
    big = set(parse_cpu_list(_read(root / "sys/devices/cpu_core/cpus")))
    little = set(parse_cpu_list(_read(root / "sys/devices/cpu_atom/cpus")))
    if big and little:
        perf = sum(1 for key in cores if any(c.index in big for c in cpus if c.core_key == key))
        return perf, len(cores) - perf
    speeds = [c.speed for c in cores.values() if c.speed]
    if not speeds or len(speeds) != len(cores):
        return len(cores), 0
    top = max(speeds)
    perf = sum(1 for s in speeds if s >= _PERF_FRACTION * top)
    return perf, len(cores) - perf


# ---------------------------------------------------------------- the probe


def probe_from(
    root: Path = Path("/"),
    sysctl: dict[str, str] | None = None,
    getprop: dict[str, str] | None = None,
    system: str | None = None,
    machine: str | None = None,
) -> DeviceProfile:
    """Parse a device from a filesystem root (/proc, /sys) plus macOS sysctl / Android getprop values.

    Pure: reads only under `root` and the dictionaries given, so recorded fixtures reproduce a device.
    """
    root = Path(root)
    if sysctl or (system or "").lower() == "darwin":
        return _probe_darwin(sysctl or {}, machine)

    cpuinfo = _read(root / "proc/cpuinfo") or ""
    blocks, glob = _parse_cpuinfo(cpuinfo)
    first = blocks[0] if blocks else {}

    if machine:
        arch = _normalise_arch(machine)
    elif "flags" in first:
        arch = "x86_64" if " lm " in f" {first['flags']} " else "x86"
    elif "Features" in first:
        arch = "armv7l" if first.get("CPU architecture", "8").strip() == "7" else "aarch64"
    else:
        arch = _normalise_arch(platform.machine())

    flags = (first.get("flags") or first.get("Features") or "").lower().split()
    features = {_X86_FLAGS.get(f) or _ARM_FLAGS.get(f) for f in flags} - {None}
    if arch == "aarch64" and "asimd" in features:
        features.add("neon")

    build_prop = root / "system/build.prop"
    props = dict(getprop or {})
    is_android = bool(props) or build_prop.is_file()
    if is_android and not props:
        props = parse_key_values(_read(build_prop) or "", sep="=")
    sys_name = (system or "linux").lower()
    os_name = "android" if is_android else ("windows" if sys_name.startswith(("windows", "cygwin")) else sys_name)

    cpus = _linux_cpus(root, blocks)
    logical = len(cpus)
    physical = len({c.core_key for c in cpus})
    perf, eff = _core_split(root, cpus)

    mem = {k: v.split()[0] for k, v in parse_key_values(_read(root / "proc/meminfo") or "").items() if v}
    ram = int(mem.get("MemTotal", 0)) * 1024
    avail = int(mem.get("MemAvailable", mem.get("MemFree", 0))) * 1024

    model = (_read(root / "proc/device-tree/model") or "").strip("\x00\n ") or glob.get("Model") or None
    compatible = [c for c in (_read(root / "proc/device-tree/compatible") or "").split("\x00") if c.strip()]
    soc = compatible[-1].split(",")[-1] if compatible else None

    sdk: int | None = None
    gpu: str | None = None
    if is_android:
        try:
            sdk = int(props.get("ro.build.version.sdk", ""))
        except ValueError:
            sdk = None
        maker, name = props.get("ro.product.manufacturer", ""), props.get("ro.product.model", "")
        model = (name if maker.lower() in name.lower() else f"{maker} {name}").strip() or model
        soc = props.get("ro.soc.model") or props.get("ro.board.platform") or soc
        gpu = props.get("ro.hardware.egl") or None

    cpu_model = (first.get("model name") or _arm_cpu_model(blocks) or glob.get("Hardware")
                 or platform.processor() or arch)
    return DeviceProfile(
        os=os_name, arch=arch, cpu_model=cpu_model, features=tuple(sorted(features)),
        logical_cores=logical, physical_cores=physical, performance_cores=perf, efficiency_cores=eff,
        ram_bytes=ram, ram_available_bytes=avail, gpu=gpu, metal=False,
        nnapi=sdk is not None and sdk >= 27, android_sdk=sdk, board=model, soc=soc,
    )


def _probe_darwin(s: dict[str, str], machine: str | None) -> DeviceProfile:
    """macOS from `sysctl -a` values; Apple silicon has Metal and P/E core levels."""

    def num(key: str, default: int = 0) -> int:
        try:
            return int(s.get(key, default))
        except ValueError:
            return default

    arch = _normalise_arch(machine or ("arm64" if num("hw.optional.arm64") else "x86_64"))
    brand = s.get("machdep.cpu.brand_string", "") or platform.processor() or arch
    features: set[str] = set()
    if arch == "aarch64":
        features = {name for key, name in _MAC_ARM_FLAGS.items() if num(key)}
        features |= {"asimd", "neon"} if features & {"asimd", "neon"} or num("hw.optional.arm64") else set()
    else:
        words = (s.get("machdep.cpu.features", "") + " " + s.get("machdep.cpu.leaf7_features", "")).lower().split()
        features = {_X86_FLAGS[w] for w in words if w in _X86_FLAGS}
    logical = num("hw.logicalcpu", num("hw.ncpu"))
    physical = num("hw.physicalcpu", logical)
    perf = num("hw.perflevel0.physicalcpu", physical)
    eff = num("hw.perflevel1.physicalcpu", 0) if "hw.perflevel1.physicalcpu" in s else physical - perf
    apple = arch == "aarch64" and brand.startswith("Apple")
    return DeviceProfile(
        os="darwin", arch=arch, cpu_model=brand, features=tuple(sorted(features)),
        logical_cores=logical, physical_cores=physical, performance_cores=perf, efficiency_cores=eff,
        ram_bytes=num("hw.memsize"), ram_available_bytes=0,  # macOS has no single "available" figure
        gpu=f"{brand} GPU (Metal)" if apple else None, metal=apple,
        board=s.get("hw.model") or None, soc=brand if apple else None,
    )


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_times(text: str | None) -> tuple[int, int] | None:
    """(busy, total) jiffies from the aggregate `cpu` line of /proc/stat."""
    for line in (text or "").splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
            total = sum(v[:8])  # guest time is already counted in user
            return total - idle, total
    return None


def cpu_busy_seconds(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU-seconds every process on the machine has run since boot (all but idle and iowait); None without
    /proc/stat. edgellm optimize subtracts its own to see what other work ran while it measured."""
    t = _cpu_times(_read(stat))
    return None if t is None else t[0] / os.sysconf("SC_CLK_TCK")


def busy_cores(sample_s: float = 0.1, stat: Path = Path("/proc/stat")) -> int:
    """Whole cores that other processes keep busy right now: /proc/stat sampled over `sample_s` while this
    process sleeps (the load average would count this process's own recent work). Rounded so that a core
    must be at least 60% busy to count."""
    a = _cpu_times(_read(stat))
    time.sleep(sample_s)
    b = _cpu_times(_read(stat))
    if not a or not b or b[1] <= a[1]:
        return 0
    busy = (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1)
    return int(busy + 0.4)


@functools.cache
def probe() -> DeviceProfile:
    """The live device, probed once per process; never raises for missing files or tools."""
    system, machine = platform.system(), platform.machine()
    sysctl = parse_key_values(_run(["sysctl", "-a"])) if system == "Darwin" else None
    getprop = parse_getprop(_run(["getprop"])) if shutil.which("getprop") and system in ("Linux", "Android") else None
    try:
        prof = probe_from(Path("/"), sysctl=sysctl, getprop=getprop or None, system=system, machine=machine)
    except Exception:  # a probe must never block a command: degrade to the bare facts
        prof = DeviceProfile(system.lower(), _normalise_arch(machine), platform.processor() or machine, (),
                             0, 0, 0, 0, 0, 0)
    n = os.cpu_count() or 1
    if system == "Linux":
        prof = replace(prof, busy_cores=busy_cores())
    if prof.logical_cores <= 0:
        prof = replace(prof, logical_cores=n, physical_cores=prof.physical_cores or n,
                       performance_cores=prof.performance_cores or n)
    return prof


# ---------------------------------------------------------------- llama.cpp build and fixtures


def llama_build_info() -> dict:
    """What the installed llama.cpp was compiled with (SIMD flags, GPU offload), parsed from its own report."""
    try:
        import llama_cpp  # lazy: the probe must work without the native library
    except Exception as exc:  # ImportError, or OSError from a broken shared library
        return {"available": False, "reason": f"llama_cpp not importable: {exc}"}
    raw = llama_cpp.llama_print_system_info()
    raw = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    features: dict[str, bool | str] = {}
    for key, value in re.findall(r"([A-Za-z0-9_]+)\s*=\s*([^|\s]+)", raw):
        features[key] = value == "1" if value in ("0", "1") else value
    try:
        offload = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        offload = False
    return {"available": True, "version": getattr(llama_cpp, "__version__", "unknown"),
            "features": features, "gpu_offload": offload, "raw": raw.strip()}


_FIXTURE_CPU_FILES = ("cpu_capacity", "cpufreq/cpuinfo_max_freq", "topology/core_id",
                      "topology/thread_siblings_list", "topology/physical_package_id", "topology/cluster_id")


def record_fixture(dest: Path, root: Path = Path("/")) -> list[Path]:
    """Copy the files `probe_from` reads into `dest`, to contribute this device as a test fixture.

    Privacy: the Pi's 'Serial' line is zeroed and only the sysctl/getprop keys the probe uses are kept.
    """
    dest = Path(dest)
    written: list[Path] = []

    def put(rel: str, text: str | None) -> None:
        if text is None:
            return
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        written.append(out)

    cpuinfo = _read(root / "proc/cpuinfo")
    put("proc/cpuinfo", re.sub(r"(?m)^(Serial\s*:\s*)\S+", r"\g<1>0000000000000000", cpuinfo) if cpuinfo else None)
    for rel in ("proc/meminfo", "proc/device-tree/model", "proc/device-tree/compatible",
                "sys/devices/cpu_core/cpus", "sys/devices/cpu_atom/cpus"):
        put(rel, _read(root / rel))
    base = root / "sys/devices/system/cpu"
    for cpu in sorted(base.glob("cpu[0-9]*")) if base.is_dir() else []:
        for f in _FIXTURE_CPU_FILES:
            put(f"sys/devices/system/cpu/{cpu.name}/{f}", _read(cpu / f))
    put("uname.txt", f"{platform.system()} {platform.machine()}\n")
    if platform.system() == "Darwin":
        keep = ("hw.", "machdep.cpu.", "kern.ostype", "kern.osproductversion")
        lines = [ln for ln in _run(["sysctl", "-a"]).splitlines() if ln.startswith(keep)]
        put("sysctl.txt", "\n".join(lines) + "\n")
    elif shutil.which("getprop"):
        keys = ("ro.build.version.", "ro.product.model", "ro.product.manufacturer", "ro.soc.",
                "ro.board.platform", "ro.hardware", "ro.product.cpu.abi")
        lines = [ln for ln in _run(["getprop"]).splitlines() if ln.startswith(tuple(f"[{k}" for k in keys))]
        put("getprop.txt", "\n".join(lines) + "\n")
    return written
