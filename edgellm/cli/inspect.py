"""edgellm inspect: a model's metadata, tensor table summary and safety verdict."""
from __future__ import annotations

import click

from .output import emit_json, human_bytes, out

LONG_KEYS = ("tokenizer.chat_template",)


@click.command("inspect")
@click.argument("model")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor (name, type, shape, bytes).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def command(model: str, show_tensors: bool, as_json: bool) -> None:
    """Validate a GGUF file's structure (before any native code opens it) and show its metadata,
    tensor types with bytes per type, parameter count and the verdict. Exits 4 when the file is
    invalid, 5 when it is valid but unsupported. For an ONNX directory: op histogram, node counts of
    the fused and the unfused (standard-op) graph of the same model, and weight bytes by kind.

    \b
    Examples:
      edgellm inspect smollm2-135m
      edgellm inspect model.gguf --json
      edgellm inspect smollm2-onnx/
    """
    from .. import store
    from ..errors import EdgeLLMError
    from ..gguf_check import validate_gguf

    ref = store.resolve(model, pull_missing=True)
    if ref.kind == "onnx":
        from .onnx_inspect import show_onnx
        return show_onnx(ref.path, as_json)
    if ref.kind != "gguf":
        raise EdgeLLMError(f"{ref.path} is a {ref.kind} model; inspect reads GGUF files")
    try:
        info = validate_gguf(ref.path)
    except EdgeLLMError as e:
        if as_json:
            emit_json({"path": str(ref.path), "valid": False, "error": str(e), "exit_code": e.exit_code})
        else:
            out.print(f"[bold red]INVALID[/bold red] {e}")
        raise SystemExit(e.exit_code) from None
    by_type = info.bytes_by_type()
    meta = {k: (v if not hasattr(v, "length") else f"[{v.type_name} × {v.length}]") for k, v in info.metadata.items()}
    if as_json:
        emit_json({
            "path": str(ref.path), "valid": True, "file_size": info.file_size, "version": info.version,
            "architecture": info.architecture, "file_type": info.file_type_name, "parameters": info.n_params,
            "hparams": info.hparams(), "metadata": meta,
            "tensor_types": {t: {"count": c, "bytes": b} for t, (c, b) in by_type.items()},
            "tensors": [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.n_bytes}
                        for t in info.tensors] if show_tensors else len(info.tensors),
        })
        return
    out.print(f"[bold green]VALID[/bold green] {ref.path} — GGUF v{info.version}, {human_bytes(info.file_size)}, "
              f"{info.architecture}, {info.file_type_name or '?'}, {info.n_params / 1e6:.1f}M parameters, "
              f"{len(info.tensors)} tensors")
    out.print("\n[bold]metadata[/bold]")
    for k, v in meta.items():
        text = str(v)
        if k in LONG_KEYS or len(text) > 100:
            text = text[:97].replace("\n", "\\n") + "…"
        out.print(f"  {k:<42} {text}", markup=False)
    out.print("\n[bold]tensors by type[/bold]")
    total = sum(b for _, b in by_type.values()) or 1
    for t, (c, b) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        out.print(f"  {t:<8} {c:>5} tensors  {human_bytes(b):>10}  {100 * b / total:5.1f}%")
    bpw = 8 * total / max(info.n_params, 1)
    out.print(f"  {'total':<8} {len(info.tensors):>5} tensors  {human_bytes(total):>10}  {bpw:.2f} bits/weight")
    if show_tensors:
        out.print("\n[bold]tensor table[/bold]")
        for t in info.tensors:
            out.print(f"  {t.name:<36} {t.type_name:<7} {str(list(t.shape)):<16} {human_bytes(t.n_bytes):>10}")
