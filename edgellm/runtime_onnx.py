"""`edgellm.load` for ONNX directories: plan (NNAPI / XNNPACK / CPU) -> providers that really exist -> Session.

The plan is the same pure function as for GGUF (edgellm.plan.choose); this module then checks it
against the execution providers of the installed onnxruntime, which on its own would silently fall
back to CPU, and records what really runs in the plan the session carries (device, reasons, warnings).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .errors import InsufficientMemoryError, UnsupportedModelError
from .plan import Artifact, Plan


def onnx_artifact(model_dir: Path) -> tuple[Artifact, dict]:
    from .runtimes.onnx_backend import read_facts

    facts = read_facts(model_dir)
    size = sum(p.stat().st_size for p in model_dir.glob("model.onnx*") if p.is_file())
    return Artifact("onnx", size, str(facts.get("quant")), facts.get("flavour") or "fused"), facts


def kv_bytes(facts: dict, n_ctx: int) -> int:
    """float32 K and V for n_ctx tokens (what the graph's present.* tensors hold)."""
    return 2 * int(facts["num_hidden_layers"]) * int(facts["num_key_value_heads"]) * int(facts["head_dim"]) * 4 * n_ctx


def apply_providers(plan: Plan, requested_device: str, available: list[str]):
    """The plan corrected for this onnxruntime build: (plan, ProviderChoice)."""
    from .runtimes.onnx_backend import LABELS, choose_provider

    explicit = requested_device.strip().lower() in ("nnapi", "xnnpack")
    choice = choose_provider(plan.device, available, explicit=explicit)
    if choice.warning is None:
        why = f"onnxruntime providers: {', '.join(p.removesuffix('ExecutionProvider') for p in choice.providers)}"
        if plan.device != "cpu":
            why += f" (nodes {LABELS[plan.device]} cannot run fall back to CPU, node by node)"
        return dataclasses.replace(plan, reasons=(*plan.reasons, why)), choice
    return dataclasses.replace(plan, device=choice.device, warnings=(*plan.warnings, choice.warning)), choice


def plan_onnx(model_dir: Path, *, device: str = "auto", n_ctx: int = 4096, threads: int | None = None,
              profile=None) -> tuple[Plan, Any, dict]:
    """(plan with the providers that exist, ProviderChoice, model facts) for an ONNX directory."""
    from .device import probe
    from .plan import choose
    from .runtimes.onnx_backend import available_providers

    artifact, facts = onnx_artifact(model_dir)
    n_ctx_eff = min(n_ctx, int(facts.get("context_length") or n_ctx))
    plan = choose(profile or probe(), artifact, requested_device=device, threads=threads, n_ctx=n_ctx_eff,
                  env=os.environ, kv_bytes=kv_bytes(facts, n_ctx_eff))
    plan, choice = apply_providers(plan, device, available_providers())
    return plan, choice, facts


def fingerprint(model_dir: Path, device: str) -> str:
    """Model bytes (graph and weights, sampled) + onnxruntime version + device."""
    import onnxruntime

    from .fingerprint import files_fingerprint

    return files_fingerprint(list(model_dir.glob("model.onnx*")), f"{onnxruntime.__version__}|{device}")


def load_onnx(model_dir: Path, *, device: str = "auto", n_ctx: int = 4096, threads: int | None = None,
              check_memory: bool = True, session_kw: dict[str, Any] | None = None):
    """An edgellm Session over onnxruntime for an ONNX directory (see edgellm.load)."""
    from .runtimes.onnx_backend import OnnxBackend
    from .session import open_session

    model_dir = Path(model_dir)
    if not (model_dir / "model.onnx").is_file():
        raise UnsupportedModelError(f"{model_dir} has no model.onnx")
    plan, choice, _ = plan_onnx(model_dir, device=device, n_ctx=n_ctx, threads=threads)
    if not plan.fits and check_memory:
        raise InsufficientMemoryError(
            f"{next((w for w in plan.warnings if 'MiB' in w), 'the model does not fit in memory')} "
            "(or pass check_memory=False to try anyway)")
    backend = OnnxBackend(model_dir, n_ctx=n_ctx, threads=plan.threads, providers=choice,
                          fingerprint=fingerprint(model_dir, choice.device))
    if backend.device != plan.device and backend.provider_warning:
        plan = dataclasses.replace(plan, device=backend.device, warnings=(*plan.warnings, backend.provider_warning))
    return open_session(backend, model_dir, plan, **(session_kw or {}))


def onnx_bytes_per_token(model_dir: Path, kv_tokens: int = 0) -> dict[str, int]:
    """Bytes one decode step reads: every weight once (a tied table is the output matrix, read in
    full) plus the float32 KV cache at `kv_tokens` (edgellm.bench's ceiling for GGUF, for ONNX)."""
    from .runtimes.onnx_backend import read_facts

    weights = sum(p.stat().st_size for p in model_dir.glob("model.onnx*") if p.is_file())
    kv = kv_bytes(read_facts(model_dir), kv_tokens) if kv_tokens else 0
    return {"file_data_bytes": weights, "weight_bytes": weights, "kv_bytes": kv, "bytes_per_token": weights + kv}
