"""`edgellm.load` for Core ML packages: plan (Neural Engine / GPU / CPU on Apple devices) -> engine -> Session.

On macOS the plan (edgellm.plan.choose, the same pure function as for GGUF and ONNX) picks the compute units
and coremltools' MLModel runs the package with its KV states. Elsewhere Core ML does not exist: the plan
refuses, and the refusal says how to check the package here instead — device='interpreter', edgellm's numpy
MIL interpreter of the saved program (what `edgellm eval` and the tests use on Linux).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .errors import BackendError, InsufficientMemoryError
from .plan import RUNTIME_OVERHEAD_BYTES, Artifact, Plan

INTERPRETER = "interpreter"
INTERPRETER_REASON = ("Core ML MIL interpreter: the package's own program run op by op in numpy, fp16 where it says "
                      "fp16 — a check of the saved artifact, not a fast runtime")
CHECK_HINT = ("to check the package on this machine, run it with edgellm's MIL interpreter: "
              "edgellm eval {path} --ref REFERENCE, or edgellm.runtime_coreml.load_coreml(path, device='interpreter')")


def coreml_facts(package: Path) -> tuple[Artifact, dict]:
    """(plan artifact, edgellm manifest) of a package; structure checked, nothing executed."""
    from .runtimes.coreml_package import check_package, load_spec, package_bytes, read_manifest

    check_package(package)
    facts = read_manifest(load_spec(package), package)
    return Artifact("coreml", package_bytes(package), str(facts.get("quant"))), facts


def state_bytes(facts: dict) -> int:
    """Both fp16 KV states, allocated in full at load whatever n_ctx is used."""
    return (2 * int(facts["num_hidden_layers"]) * int(facts["num_key_value_heads"]) * int(facts["head_dim"])
            * int(facts["context_length"]) * 2)


def plan_coreml(package: Path, *, device: str = "auto", n_ctx: int = 4096, threads: int | None = None,
                profile=None) -> tuple[Plan, dict]:
    """(plan, manifest). device='interpreter' plans the numpy MIL interpreter on any OS."""
    from .device import probe
    from .plan import choose

    artifact, facts = coreml_facts(package)
    n_ctx_eff = min(n_ctx, int(facts["context_length"]))
    prof = profile or probe()
    if device.strip().lower() == INTERPRETER:
        est = 4 * int(facts.get("n_params") or 0) + state_bytes(facts) + RUNTIME_OVERHEAD_BYTES  # float32 weights
        base = choose(prof, Artifact("onnx", artifact.size_bytes), requested_device="cpu", threads=threads,
                      n_ctx=n_ctx_eff, env=os.environ, memory_bytes=est)   # threads, memory check: as any CPU runtime
        plan = dataclasses.replace(
            base, backend="coreml", device=INTERPRETER,
            reasons=(INTERPRETER_REASON, *base.reasons[1:]))
        return plan, facts
    try:
        plan = choose(prof, artifact, requested_device=device, threads=threads, n_ctx=n_ctx_eff, env=os.environ,
                      kv_bytes=state_bytes(facts))
    except BackendError as e:
        if prof.os != "darwin":
            raise BackendError(f"{e}; {CHECK_HINT.format(path=package)}") from None
        raise
    return plan, facts


def compute_device(plan: Plan, requested: str) -> str:
    """The engine device for a plan: 'ane' (all compute units, Neural Engine first), 'gpu' (CPU and GPU:
    an Intel Mac), 'cpu' (CPU only, when asked for)."""
    if plan.device == "ane":
        return "ane"
    return "cpu" if requested.strip().lower() == "cpu" else "gpu"


def load_coreml(path: str | Path, *, device: str = "auto", n_ctx: int = 4096, threads: int | None = None,
                check_memory: bool = True, session_kw: dict[str, Any] | None = None):
    """An edgellm Session over a Core ML package (see edgellm.load); device='interpreter' runs it anywhere."""
    from .runtimes.coreml_backend import CoreMLBackend, open_engine, package_fingerprint
    from .session import open_session

    package = Path(path)
    plan, _ = plan_coreml(package, device=device, n_ctx=n_ctx, threads=threads)
    if not plan.fits and check_memory:
        raise InsufficientMemoryError(
            f"{next((w for w in plan.warnings if 'MiB' in w), 'the model does not fit in memory')} "
            "(or pass check_memory=False to try anyway)")
    engine_device = INTERPRETER if plan.device == INTERPRETER else compute_device(plan, device)
    if engine_device != INTERPRETER:
        plan = dataclasses.replace(plan, reasons=(*plan.reasons, f"Core ML compute units: {engine_device}"))
    engine = open_engine(package, engine_device, plan.threads)
    backend = CoreMLBackend(package, engine, n_ctx=n_ctx, device=engine_device,
                            fingerprint=package_fingerprint(package, engine.name, engine_device),
                            n_batch=512 if engine_device == INTERPRETER else 256)
    return open_session(backend, package, plan, **(session_kw or {}))
