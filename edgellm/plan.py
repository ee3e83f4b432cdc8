"""Backend choice: a pure function (device profile, artifact) -> plan, with a reason for every choice.

Kept free of I/O and of the live environment (callers pass `env`) so each rule is testable with
recorded device fixtures, and so `edgellm` can always tell the user *why* it runs the way it does.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from edgellm.device import DeviceProfile
from edgellm.errors import BackendError, UsageError

MiB = 1 << 20
RUNTIME_OVERHEAD_BYTES = 64 * MiB  # runtime code, scratch buffers, tokenizer: measured order of magnitude
FIT_FRACTION = 0.9  # leave 10 % of available memory to the OS and the app around us
DEVICES = ("auto", "cpu", "metal", "gpu", "nnapi", "xnnpack", "ane")
FORMATS = ("gguf", "onnx", "coreml")


@dataclass(frozen=True)
class Artifact:
    """The model file(s) to run, as far as backend choice cares."""

    format: str  # 'gguf' | 'onnx' | 'coreml'
    size_bytes: int
    quant: str | None = None
    onnx_flavour: str | None = None  # 'fused' (onnxruntime contrib ops) | 'portable' (standard ops; NNAPI-able)


@dataclass(frozen=True)
class Plan:
    """How a model will run on a device, and why."""

    backend: str  # 'llama.cpp' | 'onnxruntime' | 'coreml'
    device: str  # 'cpu' | 'metal' | 'nnapi' | 'xnnpack' | 'ane'
    threads: int
    gpu_layers: int  # 0, or -1 for all layers
    simd: str
    est_memory_bytes: int
    fits: bool
    reasons: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-ready form."""
        d = asdict(self)
        d["reasons"], d["warnings"] = list(self.reasons), list(self.warnings)
        return d


def simd_level(profile: DeviceProfile) -> str:
    """The best SIMD level the CPU kernels can use on this device."""
    f = set(profile.features)
    if "avx512f" in f:
        return "AVX-512"
    if "avx2" in f:
        return "AVX2"
    if ("asimd" in f or "neon" in f) and "dotprod" in f:
        return "NEON+dotprod+i8mm" if "i8mm" in f else "NEON+dotprod"
    if "asimd" in f or "neon" in f:
        return "NEON"
    return "scalar"


def _simd_reason(profile: DeviceProfile, simd: str) -> str:
    why = {
        "AVX-512": "avx512f present: 512-bit vector kernels",
        "AVX2": "avx2 present, no avx512f: 256-bit vector kernels",
        "NEON": "Arm NEON without dotprod: int8 dot products take several instructions",
        "scalar": "no AVX2 or NEON found: plain C kernels, expect slow decode",
    }.get(simd, "Arm NEON with dotprod (sdot/udot) speeds quantized int8 matmuls")
    if simd == "NEON+dotprod+i8mm":
        why += "; i8mm adds int8 matrix-multiply instructions"
    return f"SIMD: {simd} ({why})"


def _positive_int(value: object, source: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if isinstance(value, bool) or n < 1:
        raise UsageError(f"{source} must be a positive whole number of threads, got {value!r}")
    return n


def max_threads(profile: DeviceProfile) -> int:
    """The most threads edgellm starts: 4 per logical core (64 when the count is unknown). Far more
    crashes or hangs llama.cpp (99999 segfaulted, 4096 hung) and never runs faster."""
    return 4 * profile.logical_cores if profile.logical_cores > 0 else 64


def _bounded(n: int, source: str, profile: DeviceProfile) -> int:
    top = max_threads(profile)
    if n > top:
        raise UsageError(f"{source}={n} is more than this device can use: at most {top} "
                         f"(4 × its {profile.logical_cores or 'unknown number of'} logical cores)")
    return n


def _threads(profile: DeviceProfile, threads: int | None, env: Mapping[str, str]) -> tuple[int, str]:
    if threads is not None:
        n = _bounded(_positive_int(threads, "threads"), "threads", profile)
        return n, f"threads={n}: set explicitly"
    if env.get("EDGELLM_THREADS", "").strip():
        n = _bounded(_positive_int(env["EDGELLM_THREADS"], "EDGELLM_THREADS"), "EDGELLM_THREADS", profile)
        return n, f"threads={n}: from EDGELLM_THREADS"
    if profile.performance_cores >= 1:
        n = profile.performance_cores
        why = f"threads={n}: the {n} performance cores"
        notes = []
        if profile.efficiency_cores:
            notes.append(f"the {profile.efficiency_cores} efficiency cores would make every step wait for the slowest")
        if profile.logical_cores > profile.physical_cores:
            notes.append("hyper-threads add nothing for memory-bound decode")
        n, why = _leave_busy_cores(profile, n, why + (f" ({'; '.join(notes)})" if notes else ""))
        return n, why
    n = max(1, profile.physical_cores or profile.logical_cores)
    return _leave_busy_cores(profile, n, f"threads={n}: no performance cores reported, so all {n} cores")


def _leave_busy_cores(profile: DeviceProfile, n: int, why: str) -> tuple[int, str]:
    """Fewer threads when other work already keeps cores busy. Every llama.cpp / onnxruntime step ends at a
    barrier that waits for the slowest thread, so one thread sharing a core with another process stalls all
    of them: on this project's 2-core VM, 2 threads beside one busy process decoded 34× slower than alone,
    1 thread only 1.5× slower (docs/reliability.md). Explicit settings are never changed."""
    free = max(1, (profile.logical_cores or n) - profile.busy_cores)
    if profile.busy_cores <= 0 or n <= free:
        return n, why
    return free, (f"threads={free}: {profile.busy_cores} of the {profile.logical_cores} cores are busy with other "
                  f"work, and a thread that shares a core stalls every step (otherwise {why.split(': ', 1)[1]})")


def _check_device(requested: str) -> str:
    req = (requested or "auto").strip().lower()
    if req not in DEVICES:
        raise UsageError(f"unknown device {requested!r}: choose one of {', '.join(DEVICES)}")
    return "metal" if req == "gpu" else req


def _where(profile: DeviceProfile) -> str:
    return f"{profile.os}/{profile.arch}"


def _gguf(profile: DeviceProfile, req: str, simd: str) -> tuple[str, int, list[str]]:
    apple_gpu = profile.os == "darwin" and profile.arch == "aarch64" and profile.metal
    if req == "metal":
        if not apple_gpu:
            raise BackendError(f"Metal needs an Apple-silicon Mac; this device is {_where(profile)}: use --device cpu")
        return "metal", -1, ["Metal: requested; Apple GPU present, all layers offloaded"]
    if req in ("nnapi", "xnnpack", "ane"):
        raise BackendError(f"device {req!r} runs ONNX or Core ML artifacts, not GGUF: use --device auto or cpu")
    if req == "cpu":
        return "cpu", 0, [f"CPU: requested; llama.cpp {simd} kernels"]
    if apple_gpu:
        return "metal", -1, ["Metal: Apple GPU present, all layers offloaded"]
    return "cpu", 0, [f"CPU: llama.cpp {simd} kernels (no GPU backend for GGUF on {_where(profile)})"]


def _onnx(profile: DeviceProfile, artifact: Artifact, req: str) -> tuple[str, list[str]]:
    flavour = artifact.onnx_flavour or "fused"
    android = profile.os == "android"
    sdk = profile.android_sdk
    if req in ("metal", "ane"):
        raise BackendError(f"device {req!r} is not available for ONNX models: use --device auto, cpu, nnapi or xnnpack")
    if req == "cpu":
        return "cpu", ["CPU: requested; onnxruntime CPU execution provider"]
    if req == "nnapi" or (req == "auto" and android and profile.nnapi and flavour == "portable"):
        if not (android and profile.nnapi):
            raise BackendError(f"NNAPI needs Android API 27 or newer; this device is {_where(profile)}"
                               + (f" API {sdk}" if sdk is not None else ""))
        if flavour != "portable":
            raise BackendError("NNAPI needs the portable ONNX graph; this artifact is fused: "
                               "re-export with the portable flavour")
        return "nnapi", [f"NNAPI: Android API {sdk} ≥ 27 and the artifact is a portable ONNX graph"]
    if req == "xnnpack" or (req == "auto" and android and profile.arch == "aarch64"):
        if profile.arch not in ("aarch64", "armv7l", "x86_64"):
            raise BackendError(f"XNNPACK is not available on {_where(profile)}: use --device cpu")
        if req == "xnnpack":
            return "xnnpack", ["XNNPACK: requested; onnxruntime XNNPACK execution provider"]
        why = ("NNAPI needs the portable graph; this one is fused" if flavour != "portable"
               else f"NNAPI needs Android API ≥ 27, this device reports {sdk}")
        return "xnnpack", [f"XNNPACK: Android on aarch64 and {why}"]
    return "cpu", [f"CPU: onnxruntime CPU execution provider on {_where(profile)}"]


def _coreml(profile: DeviceProfile, req: str) -> tuple[str, list[str]]:
    if profile.os != "darwin":
        raise BackendError(f"Core ML models run only on Apple devices; this device is {_where(profile)}: "
                           "export GGUF or ONNX instead")
    if req in ("nnapi", "xnnpack", "metal"):
        raise BackendError(f"device {req!r} is not available for Core ML models: use --device auto, ane or cpu")
    if req == "cpu":
        return "cpu", ["Core ML: requested CPU only"]
    if profile.arch != "aarch64":
        return "cpu", ["Core ML: Intel Mac has no Neural Engine, Core ML uses CPU/GPU"]
    return "ane", ["Core ML: Apple silicon, Neural Engine with GPU/CPU fallback chosen by Core ML"]


def choose(
    profile: DeviceProfile,
    artifact: Artifact,
    *,
    requested_device: str = "auto",
    threads: int | None = None,
    n_ctx: int = 4096,
    env: Mapping[str, str] | None = None,
    kv_bytes: int = 0,
    memory_bytes: int | None = None,
) -> Plan:
    """Pick backend, device, threads and GPU offload for `artifact` on `profile`, with reasons.

    `env` is the environment to honour (EDGELLM_THREADS); None means none, so callers pass os.environ
    explicitly and the function stays pure. `kv_bytes` is the caller's KV-cache estimate for `n_ctx`;
    `memory_bytes` the caller's whole estimate (edgellm.memplan), replacing weights + KV + overhead.
    Raises UsageError for bad options, BackendError when the request cannot run on this device.
    """
    env = env or {}
    req = _check_device(requested_device)
    if artifact.format not in FORMATS:
        raise UsageError(f"unknown artifact format {artifact.format!r}: expected one of {', '.join(FORMATS)}")
    if n_ctx < 1:
        raise UsageError(f"context size must be positive, got {n_ctx}")
    simd = simd_level(profile)
    gpu_layers = 0
    if artifact.format == "gguf":
        backend = "llama.cpp"
        device, gpu_layers, reasons = _gguf(profile, req, simd)
    elif artifact.format == "onnx":
        backend = "onnxruntime"
        device, reasons = _onnx(profile, artifact, req)
    else:
        backend = "coreml"
        device, reasons = _coreml(profile, req)

    n_threads, thread_reason = _threads(profile, threads, env)
    reasons = [*reasons, thread_reason, _simd_reason(profile, simd)]
    warnings: list[str] = []
    if n_threads > profile.logical_cores > 0:  # only possible when set explicitly or by EDGELLM_THREADS
        warnings.append(f"threads={n_threads} exceeds the {profile.logical_cores} logical cores: expect slower decode")

    est = memory_bytes if memory_bytes is not None else artifact.size_bytes + max(0, kv_bytes) + RUNTIME_OVERHEAD_BYTES
    budget_base = profile.ram_available_bytes or profile.ram_bytes
    fits = budget_base <= 0 or est <= FIT_FRACTION * budget_base
    which = "available" if profile.ram_available_bytes else "total"
    if not fits:
        warnings.append(f"needs about {est / MiB:.0f} MiB but only {budget_base / MiB:.0f} MiB of memory is {which} "
                        f"(limit {FIT_FRACTION:.0%}): use a smaller quant or a shorter context")
    elif budget_base <= 0:
        warnings.append("memory size unknown: could not check that the model fits")
    return Plan(backend=backend, device=device, threads=n_threads, gpu_layers=gpu_layers, simd=simd,
                est_memory_bytes=est, fits=fits, reasons=tuple(reasons), warnings=tuple(warnings))


def describe(plan: Plan) -> str:
    """Multi-line human summary: what runs where, and why."""
    lines = [
        f"backend   {plan.backend} on {plan.device}",
        f"threads   {plan.threads}",
        f"gpu       {'all layers' if plan.gpu_layers == -1 else f'{plan.gpu_layers} layers'}",
        f"simd      {plan.simd}",
        f"memory    ~{plan.est_memory_bytes / MiB:.0f} MiB ({'fits' if plan.fits else 'does NOT fit'})",
        "why:",
        *(f"  - {r}" for r in plan.reasons),
    ]
    if plan.warnings:
        lines += ["warnings:", *(f"  ! {w}" for w in plan.warnings)]
    return "\n".join(lines)
