"""`edgellm inspect` for ONNX directories: op histogram, fused vs unfused node counts, weight bytes."""
from __future__ import annotations

from pathlib import Path

from .output import emit_json, human_bytes, out


def show_onnx(path: Path, as_json: bool) -> None:
    from edgellm.converters.onnx_inspect import inspect_onnx

    info = inspect_onnx(path)
    if as_json:
        emit_json(info)
        return
    n = info["node_counts"]
    out.print(f"[bold green]ONNX[/bold green] {info['path']} — {info['flavour']} graph, {info['quant']}, "
              f"{info['nodes']} nodes, {human_bytes(info['weight_bytes'])} of weights, {info['layers']} layers")
    if n["fused"] and n["unfused"]:
        out.print(f"  fused graph {n['fused']} nodes vs unfused (standard ops) {n['unfused']}: {n['ratio']}× fewer")
    out.print("\n[bold]ops[/bold]")
    for op, count in info["ops"].items():
        out.print(f"  {op:<36} {count:>5}")
    out.print("\n[bold]weights by kind[/bold]")
    for kind, b in info["weight_bytes_by_kind"].items():
        out.print(f"  {kind:<16} {human_bytes(b):>10}")
    out.print("\n[bold]files[/bold]")
    for name, size in info["files"].items():
        out.print(f"  {name:<28} {human_bytes(size):>10}")
