"""Regenerate benchmarks/README.md from the JSON the benchmark scripts wrote to benchmarks/out/*.json.

No figure in benchmarks/README.md is typed by hand: every table is rendered here from a committed JSON
file, next to the command that reproduces it, the machine it ran on, its anchor, and PASS/FAIL against
each target the script reports. A benchmark whose JSON is missing gets one line saying how to produce it.

    python benchmarks/report.py            # or: make report
    python benchmarks/report.py --check    # exit 1 if README.md is not what the JSON gives (for CI)
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from report_render import (  # benchmarks/ is on sys.path: report.py runs as a script, tests add it
    get,
    num,
    render_concurrency,
    render_convert,
    render_coreml,
    render_generic,
    render_memplan,
    render_onnx,
    render_optimize,
    render_prune,
    render_quant,
    render_runtime,
    render_serve,
    render_speculative,
    render_web,
    targets_table,
)

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
README = HERE / "README.md"


# ------------------------------------------------------------------ the sections, in README order


@dataclass
class Section:
    name: str                     # benchmarks/out/<name>.json
    title: str
    command: str                  # how to produce the JSON (used when the file is missing or has no meta)
    anchor: str                   # what edgellm is measured against, in the same run
    render: Callable[[dict], str] = render_generic
    owner_doc: str = ""           # the docs page that explains the feature


SECTIONS = (
    Section("runtime_bench", "Runtime: decode, prefill, TTFT",
            "python benchmarks/runtime_bench.py --threads 2 --rounds 5",
            "llama.cpp's C++ llama-bench built from the llama.cpp llama-cpp-python vendors, on the same shared "
            "libraries (the comparison isolates the driver loop), and llama-cpp-python's own generate()",
            render_runtime, "docs/runtime.md"),
    Section("quant_quality", "Quantization quality at equal size",
            "python benchmarks/quant_quality.py --references on-grid,rotated --types Q4_0,Q4_1,IQ4_NL,Q4_K_M,Q8_0",
            "llama.cpp's quantizer at the same sizes, both as llama-quantize's presets and as an expert runs it "
            "(llama-imatrix on the same calibration text, then llama-quantize --imatrix)",
            render_quant, "docs/convert.md"),
    Section("quant_quality_gptq", "Quantization quality with GPTQ rounding",
            "python benchmarks/quant_quality.py --references rotated --types Q4_0,IQ4_NL,Q4_K_M --gptq "
            "--out benchmarks/out/quant_quality_gptq.json",
            "llama.cpp's quantizer at the same sizes (presets, and llama-imatrix + llama-quantize --imatrix)",
            render_quant, "docs/convert.md"),
    Section("onnx_bench", "ONNX export and ONNX Runtime",
            "python benchmarks/onnx_bench.py --threads 2 --rounds 15 --wait-idle 0.1",
            "onnxruntime-genai's model builder at its defaults (`-p int4 -e cpu`: round-to-nearest, blocks of 32) "
            "and at its best settings (block_size=64, algo_config=k_quant / k_quant_mixed), run in onnxruntime-genai's "
            "own C++ loop; llama.cpp Q4_0", render_onnx, "docs/onnx.md"),
    Section("serve_bench", "Serving: concurrent clients",
            "python benchmarks/serve_bench.py --clients 8 --max-tokens 128 --rounds 5",
            "the same server with one client (2 requests in a row), and llama.cpp's own llama-server built from the "
            "vendored source on the same model, threads and slots", render_serve, "docs/serve.md"),
    Section("concurrency_bench", "Serving: short requests, quiet and beside a busy process",
            "python benchmarks/concurrency_bench.py",
            "the same server answering one request at a time; pinned thread counts beside the default choice",
            render_concurrency, "docs/reliability.md"),
    Section("memplan_accuracy", "Memory planner accuracy",
            "python benchmarks/memplan_accuracy.py --ctx 1024 2048 4096 8192 --second-shape",
            "the measured peak RSS (VmHWM) of a fresh process per context, and llama.cpp's own report of its KV "
            "and compute buffers; target |estimate / measured − 1| ≤ 15 %", render_memplan, "docs/serve.md"),
    Section("convert_cost", "Conversion cost",
            "python benchmarks/convert_cost.py --rounds 3",
            "llama.cpp's own route: convert_hf_to_gguf.py --outtype f16, then llama_model_quantize",
            render_convert, "docs/convert.md"),
    Section("prune_distill", "Pruning and distillation",
            "python benchmarks/prune_distill.py --minutes 35 --threads 2",
            "the teacher quantized to the student's size (a preset and --target-size)", render_prune,
            "docs/prune-distill.md"),
    Section("coreml", "Core ML export",
            "python benchmarks/coreml_bench.py", "coremltools' own int4 recipe on the same program",
            render_coreml, "docs/coreml.md"),
    Section("speculative_bench", "Speculative decoding", "python benchmarks/speculative_bench.py",
            "plain decoding of the same model, same prompts and threads", render_speculative, "docs/runtime.md"),
    Section("speculative_bench_epyc", "Speculative decoding on a second device (AMD EPYC), fitted cost model",
            "python benchmarks/speculative_bench.py --threads 2 --rounds 5 --cost "
            "--out benchmarks/out/speculative_bench_epyc.json",
            "plain decoding of the same model, same prompts and threads", render_speculative, "docs/runtime.md"),
    Section("optimize_bench", "edgellm optimize: the measured fastest path",
            "python benchmarks/optimize_bench.py", "the candidates it chooses between, measured on this device",
            render_optimize, "docs/runtime.md"),
    Section("optimize_bench_epyc", "edgellm optimize on a second device (AMD EPYC)",
            "python benchmarks/optimize_bench.py --threads 2 --rounds 5 --out benchmarks/out/optimize_bench_epyc.json",
            "the candidates it chooses between, measured on this device (the same script as above, another CPU), "
            "and llama-bench with flash attention off and on", render_optimize, "docs/runtime.md"),
    Section("decode_context", "llama.cpp decode against llama-bench by context size and flash attention",
            "python benchmarks/decode_context.py --threads 2 --rounds 5",
            "llama-bench tg128 (-p 0 -n 128) at the same flash-attention setting, rounds interleaved",
            render_generic, "docs/runtime.md"),
    Section("web_bench", "Browser chat page latency",
            "python benchmarks/web_bench.py --rounds 7", "the same request through plain HTTP (the API)",
            render_web, "docs/web-chat.md"),
    Section("mobile_bench", "Mobile packaging", "python benchmarks/mobile_bench.py",
            "a cold start of the app's engine (no shipped state)", render_generic, "docs/mobile.md"),
)


def _machine(d: dict) -> str:
    m = get(d, "meta.machine") or d.get("machine")
    if not isinstance(m, dict):
        return "not recorded in the JSON"
    if "cpu" in m:
        return (f"{m.get('cpu')}, {m.get('logical_cores')} logical cores, {m.get('ram_gib')} GiB, {m.get('os')}"
                + (f" ({', '.join(m['simd'])})" if m.get("simd") else ""))
    return ", ".join(f"{k} {v}" for k, v in m.items())


def _load(d: dict) -> str:
    start = get(d, "meta.load_average_start") or d.get("load_average_start") or get(d, "load_average.start")
    end = get(d, "meta.load_average_end") or d.get("load_average_end") or get(d, "load_average.end")
    if start is None and end is None:
        one = d.get("load_avg") or get(d, "machine.load_before")
        return "" if one is None else f"load average {num(one[0] if isinstance(one, list) else one, '.1f')}"

    def fmt(x: Any) -> str:  # the 1-minute figure
        return "?" if x is None else num(x[0] if isinstance(x, list) else x, ".1f")

    return f"load average {fmt(start)} at the start, {fmt(end)} at the end"


def render_section(sec: Section, path: Path) -> str:
    head = [f"## {sec.title}", ""]
    if not path.is_file():
        return "\n".join(head + [f"Not measured yet: `{sec.command}` writes `benchmarks/out/{path.name}`.", ""])
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return "\n".join(head + [f"`benchmarks/out/{path.name}` is unreadable ({e}); rerun `{sec.command}`.", ""])
    command = get(d, "meta.command") or sec.command
    when = get(d, "meta.date_utc") or d.get("date") or d.get("time_utc")
    load = _load(d)
    facts = [f"- Reproduce: `{command}`",
             f"- Machine: {_machine(d)}" + (f"; {load}" if load else "") + (f"; run {when} UTC" if when else ""),
             f"- Anchor: {sec.anchor}",
             f"- JSON: [`out/{path.name}`](out/{path.name})" + (f"; explained in [{sec.owner_doc}](../{sec.owner_doc})"
                                                                 if sec.owner_doc else "")]
    body = [sec.render(d)]
    t = targets_table(d)
    if t:
        body += ["", "Targets (as the script reports them):", "", t]
    return "\n".join(head + facts + ["", *body, ""])


HEADER = """# Benchmarks

Generated by `make report` (`python benchmarks/report.py`) from the JSON the scripts in this folder wrote to
`benchmarks/out/`; do not edit by hand. Each script measures edgellm against its anchor *in the same run* (rounds
interleaved where speed is measured) and reports ratios; absolute speeds move with the load of the shared machine
they ran on, so only the same-run ratios are meaningful. Quality figures are KL divergence and top-1 agreement to
the unquantized model on held-out text (`edgellm/data/heldout.txt`, never calibrated on), plus perplexity.
"""


def build(out_dir: Path = OUT) -> str:
    known = {s.name for s in SECTIONS}
    parts = [HEADER]
    parts += [render_section(s, out_dir / f"{s.name}.json") for s in SECTIONS]
    for extra in sorted(out_dir.glob("*.json")):   # a JSON no section knows yet still gets its figures shown
        if extra.stem not in known:
            parts.append(render_section(Section(extra.stem, extra.stem.replace("_", " ").capitalize(),
                                                f"the script that writes {extra.name}", "see the JSON"), extra))
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=OUT, help="where the JSON files are (default benchmarks/out)")
    ap.add_argument("--readme", type=Path, default=README, help="the file to write (default benchmarks/README.md)")
    ap.add_argument("--check", action="store_true", help="only check that the README is up to date (exit 1 if not)")
    args = ap.parse_args(argv)
    text = build(args.out_dir)
    if args.check:
        current = args.readme.read_text(encoding="utf-8") if args.readme.is_file() else ""
        if current != text:
            print(f"{args.readme} is out of date: run `make report`", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(text, encoding="utf-8")
    print(f"wrote {args.readme} ({len(text)} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
