"""edgellm devices: what this device has, and how edgellm would run a model on it."""
from __future__ import annotations

import click

from .output import emit_json, human_bytes, out


@click.command("devices")
@click.option("--model", "model", default=None,
              help="Plan for this model [default: the embedded model, from the store if pulled].")
@click.option("--ctx", "n_ctx", type=int, default=4096, show_default=True, help="Context size for the memory estimate.")
@click.option("--json", "as_json", is_flag=True, help="Print profile, llama.cpp build and plan as JSON.")
def command(model: str | None, n_ctx: int, as_json: bool) -> None:
    """Show the device profile (OS, CPU, SIMD features, performance/efficiency cores, RAM, GPU/NPU,
    board), what the installed llama.cpp was built with, onnxruntime's execution providers, and which
    backend and thread count edgellm would choose for a model — with the reasons (for an ONNX model
    the provider that really runs, fallback included).

    \b
    Example:
      edgellm devices --json
    """
    import os

    from .. import store
    from ..device import llama_build_info, probe
    from ..plan import choose

    profile = probe()
    build = llama_build_info()
    artifact, name, kv = _artifact(model, n_ctx, store)
    plan = choose(profile, artifact, n_ctx=n_ctx, env=os.environ, kv_bytes=kv)
    ort = onnxruntime_info()
    if artifact.format == "onnx":  # what onnxruntime really has, not what the plan hoped for
        from ..runtime_onnx import apply_providers
        plan = apply_providers(plan, "auto", [f"{p}ExecutionProvider" for p in ort.get("providers", [])])[0]
    decision = _decision(model, store)
    if as_json:
        emit_json({"device": profile.to_dict(), "llama_cpp": build, "onnxruntime": ort, "model": name,
                   "plan": plan.to_dict(), "optimized": decision.to_dict() if decision else None})
        return
    p = profile
    rows = [
        ("OS / arch", f"{p.os} / {p.arch}"), ("CPU", p.cpu_model),
        ("Cores", f"{p.logical_cores} logical, {p.physical_cores} physical: "
                  f"{p.performance_cores} performance + {p.efficiency_cores} efficiency"),
        ("SIMD", ", ".join(p.features) or "-"),
        ("RAM", f"{human_bytes(p.ram_bytes)} ({human_bytes(p.ram_available_bytes)} available)"),
        ("GPU", p.gpu or "-"), ("Metal", "yes" if p.metal else "no"),
        ("NNAPI", f"yes (Android API {p.android_sdk})" if p.nnapi else "no"),
        ("Board", p.board or "-"),
        ("llama.cpp", _build_line(build)),
        ("onnxruntime", f"{ort['version']}: {', '.join(ort['providers'])}" if ort.get("available")
         else f"not installed ({ort.get('reason')})"),
    ]
    for k, v in rows:
        out.print(f"[bold]{k:<10}[/bold] {v}")
    out.print(f"\n[bold]Plan for {name}[/bold]: {plan.backend} on {plan.device}, {plan.threads} threads, "
              f"{plan.simd}, ~{human_bytes(plan.est_memory_bytes)} ({'fits' if plan.fits else 'does NOT fit'})")
    for r in plan.reasons:
        out.print(f"  - {r}")
    for w in plan.warnings:
        out.print(f"  [yellow]! {w}[/yellow]")
    if decision is not None:
        from ..optimize import DEEP_TOKENS, TURN_TOKENS

        out.print(f"\n[bold]Optimized[/bold] (chat, run and serve --parallel 1 use it): {decision.winner} — "
                  f"{decision.reason()}")
        for c in decision.candidates:
            figures = (f"decode {c.decode_tps} tok/s ({c.deep_decode_tps} after {DEEP_TOKENS} tokens), prefill "
                       f"{c.prefill_tps} tok/s, TTFT {c.ttft_s} s, a {TURN_TOKENS}-token turn after {DEEP_TOKENS} "
                       f"{c.turn_prefill_s} s; whole turns {c.conversation_tps:.1f} tok/s"
                       if c.decode_tps else c.excluded or "not timed")
            out.print(f"  - {c.name}: {c.size_bytes / 1e6:.1f} MB, KLD {c.mean_kld}, {figures}")


def _decision(model, store):
    """The stored `edgellm optimize` decision for a GGUF model on this device, if any (never measures)."""
    from ..errors import EdgeLLMError
    from ..optimize import cached

    try:
        if model is None and not store.is_pulled(store.DEFAULT_ALIAS):
            return None
        return cached(model) or cached(model, "lossless")
    except EdgeLLMError:
        return None


def _artifact(model, n_ctx, store):
    from ..plan import Artifact

    if model is None and not store.is_pulled(store.DEFAULT_ALIAS):
        known = store.KNOWN_MODELS[store.DEFAULT_ALIAS]
        return Artifact("gguf", known.size, "Q4_1"), f"{known.alias} (not pulled yet)", 0
    ref = store.resolve(model, pull_missing=False)
    if ref.kind == "onnx":
        from ..runtime_onnx import kv_bytes, onnx_artifact
        artifact, facts = onnx_artifact(ref.path)
        return artifact, str(ref.path), kv_bytes(facts, n_ctx)
    if ref.kind != "gguf":
        size = sum(f.stat().st_size for f in ref.path.rglob("*") if f.is_file())
        return Artifact({"hf": "gguf"}.get(ref.kind, ref.kind), size), str(ref.path), 0
    from ..gguf_check import validate_gguf
    from ..runtime import kv_cache_bytes

    info = validate_gguf(ref.path)
    return Artifact("gguf", ref.path.stat().st_size, info.file_type_name), ref.alias or str(ref.path), \
        kv_cache_bytes(info, n_ctx)


def onnxruntime_info() -> dict:
    """The installed onnxruntime and its execution providers (what can really run, not what was hoped)."""
    try:
        import onnxruntime
    except ImportError as e:
        return {"available": False, "reason": str(e)}
    return {"available": True, "version": onnxruntime.__version__,
            "providers": [p.removesuffix("ExecutionProvider") for p in onnxruntime.get_available_providers()]}


def _build_line(build: dict) -> str:
    if not build.get("available", True) and "features" not in build:
        return f"not available ({build.get('reason', '')})"
    feats = [k for k, v in build.get("features", {}).items() if v]
    gpu = ", offload backends compiled in (GPU/RPC)" if build.get("gpu_offload") else ""
    return f"llama-cpp-python {build.get('version', '?')}: {' '.join(feats)}{gpu}"
