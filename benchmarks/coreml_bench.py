"""Core ML export against its anchors, in one run, on the embedded SmolLM2-135M; JSON with a pass/fail per target.

- conversion: `edgellm convert --format coreml` (defaults: calibrated int4, 2048-token state) in a child process —
  wall time and the child's peak RSS;
- parity: the saved F16 package, run by edgellm's MIL interpreter, against llama.cpp's F32 logits of the same
  weights (worst cosine over the prompt and a held-out passage), greedy 32 tokens, and prefill-then-decode
  through the state against one full evaluation;
- quality at size: mean KL divergence to the F32 model on held-out text (converters.evaluate, the same code as
  `edgellm eval`) of edgellm's int4, coremltools' own int4 recipe (round-to-nearest, linear_symmetric, per_block,
  block 32 — swift-transformers' Mistral export) applied to edgellm's f16 program, int8, palette4 and f16; every
  figure comes from the saved packages' own weights;
- structure: op histogram, state shapes, what reads compressed weights, package sizes.

    pip install 'edgellm[coreml]'
    python benchmarks/coreml_bench.py          # writes benchmarks/out/coreml.json (with benchmeta's meta block)

Artifacts are built under --work (default benchmarks/out/coreml-work) and reused; --fresh rebuilds them.
Core ML itself cannot run here (no macOS), so no speed is measured: see docs/coreml.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchmeta
import numpy as np

PROMPT = "The three most important things to know about growing tomatoes are"
TARGETS = (  # key, description, "min"/"max", bound
    ("parity_cosine_min", "F16 package (interpreter) vs llama.cpp F32 logits, worst cosine", "min", 0.999),
    ("greedy32_identical", "greedy 32 tokens identical to llama.cpp F32", "min", 1),
    ("incremental_top1_equal", "prefill-then-decode argmax equals one full evaluation", "min", 1),
    ("int4_kld_vs_anchor", "edgellm int4 KLD / coremltools int4 recipe KLD", "max", 0.6),
    ("int4_size_vs_anchor", "edgellm int4 size / coremltools int4 recipe size", "max", 1.0),
    ("sdpa_per_layer", "scaled_dot_product_attention ops per decoder layer", "min", 1),
    ("rope_tables_uncompressed", "compressed weights feed only linear/gather ops", "min", 1),
    ("convert_seconds", "default conversion wall time (s), 2 cores", "max", 180),
    ("convert_peak_rss_gb", "default conversion peak RSS (GB)", "max", 3.0),
)


def _log(msg: str) -> None:
    print(f"[coreml_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def convert_default(src: Path, dest: Path) -> dict:
    """`edgellm convert SRC --format coreml -o DEST --json` in a child process: its summary, wall time, peak RSS."""
    if dest.exists():
        shutil.rmtree(dest)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgellm.cli", "convert", str(src), "--format", "coreml", "-o",
                           str(dest), "--json", "--force"], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed: {proc.stderr.strip().splitlines()[-1:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"summary": json.loads(proc.stdout), "wall_seconds": round(wall, 1),
            "peak_rss_gb": round(max(peak, before) / 2**20, 3)}


def prepare(work: Path, ctx: int, fresh: bool) -> dict[str, Path]:
    from coremltools.models import MLModel

    from edgellm import store
    from edgellm.converters.calibrate import weight_getter
    from edgellm.converters.coreml_export import export_coreml, save_package
    from edgellm.converters.coreml_quant import coremltools_int4
    from edgellm.converters.gguf_source import read_gguf
    from edgellm.converters.gguf_writer import write_gguf
    from edgellm.converters.onnx_export import calibrate_units

    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    src = store.pull(quiet=True)
    ckpt = read_gguf(src)
    weights = weight_getter(ckpt)
    p = {"f32_gguf": work / "f32.gguf", **{q: work / q / "model.mlpackage" for q in
                                           ("f16", "int4", "int8", "palette4", "coreml_int4")}}
    times: dict[str, float] = {}
    if not p["f32_gguf"].exists():
        _log("F32 GGUF (the reference)")
        write_gguf(ckpt, p["f32_gguf"], "F32")
    calib = None
    for q in ("f16", "int4", "int8", "palette4"):
        if p[q].exists():
            continue
        if q in ("int4", "int8") and calib is None:
            _log("calibration (Gram matrices)")
            calib = calibrate_units(ckpt, None, 4096, fisher=False)
        _log(f"edgellm {q}")
        t = time.perf_counter()
        export_coreml(ckpt, p[q], quant=q, ctx=ctx, weights=weights,
                      calibration=calib if q in ("int4", "int8") else None, replace_side_files=True)
        times[q] = round(time.perf_counter() - t, 1)
    if not p["coreml_int4"].exists():
        _log("coremltools' int4 recipe on the f16 program (the anchor)")
        t = time.perf_counter()
        anchor = coremltools_int4(MLModel(str(p["f16"]), skip_model_load=True))
        save_package(anchor, p["coreml_int4"])
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(p["f16"].parent / name, p["coreml_int4"].parent / name)
        times["coreml_int4"] = round(time.perf_counter() - t, 1)
    (work / "export_seconds.json").write_text(json.dumps({**_read(work / "export_seconds.json"), **times}))
    return p


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def greedy(backend, ids: list[int], n: int) -> list[int]:
    import edgellm

    backend.truncate(0)
    backend.eval(ids)
    out = []
    for _ in range(n):
        out.append(backend.sample(edgellm.GREEDY))
        backend.eval(out[-1:])
    return out


def parity(p: dict[str, Path], ctx: int) -> dict:
    import edgellm
    from edgellm.runtime_coreml import load_coreml
    from edgellm.texts import heldout_text

    with edgellm.load(p["f32_gguf"], n_ctx=ctx, disk_cache=False, threads=2) as ref, \
            load_coreml(p["f16"], device="interpreter", n_ctx=ctx, session_kw={"disk_cache": False}) as cm:
        prompt = ref.tokenize(PROMPT)
        passage = ref.tokenize(heldout_text()[:4000])[:256]
        cos = []
        for ids in (prompt, passage):
            ref.backend.truncate(0)
            cm.backend.truncate(0)
            cos.append(cosine(cm.backend.eval_all_logits(ids), ref.backend.eval_all_logits(ids)))
        cos = np.concatenate(cos)
        want, got = greedy(ref.backend, prompt, 32), greedy(cm.backend, prompt, 32)
        cm.backend.truncate(0)
        full = cm.backend.eval_all_logits(passage[:96])
        cm.backend.truncate(0)
        parts = [cm.backend.eval_all_logits(passage[:64])] + [cm.backend.eval_all_logits([t]) for t in passage[64:96]]
        step = np.concatenate(parts)
    return {"parity_cosine_min": round(float(cos.min()), 6), "parity_cosine_mean": round(float(cos.mean()), 6),
            "parity_positions": int(cos.size), "greedy32_identical": int(want == got),
            "greedy32_matching_prefix": next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), 32),
            "incremental_top1_equal": int(np.array_equal(step.argmax(-1), full.argmax(-1))),
            "incremental_max_abs_logit_diff": round(float(np.abs(step - full).max()), 4),
            "incremental_cosine_min": round(float(cosine(step, full).min()), 7)}


def quality(p: dict[str, Path], chunks: int) -> dict:
    from edgellm.converters.evaluate import evaluate
    from edgellm.texts import heldout_text

    rows = {}
    for q in ("int4", "coreml_int4", "int8", "palette4", "f16"):
        _log(f"quality {q} (interpreter, {chunks} chunks)")
        r = evaluate(p[q], p["f32_gguf"], heldout_text(), ctx=512, max_chunks=chunks)
        rows[q] = {"size_bytes": r.size_bytes, "bits_per_weight": round(r.bits_per_weight, 3),
                   "mean_kld": round(r.mean_kld, 5), "p99_kld": round(r.p99_kld, 4),
                   "top1": round(r.top1_agreement, 4), "perplexity": round(r.perplexity, 3),
                   "ref_perplexity": round(r.ref_perplexity, 3), "tokens_scored": r.tokens_scored}
    return rows


def structure(p: dict[str, Path]) -> dict:
    from edgellm.runtimes.coreml_package import (
        compressed_consumers,
        io_contract,
        load_spec,
        op_histogram,
        package_bytes,
    )

    out = {}
    for q in ("f16", "int4", "int8", "palette4", "coreml_int4"):
        spec = load_spec(p[q])
        out[q] = {"op_histogram": op_histogram(spec), "compressed_consumers": sorted(compressed_consumers(spec)),
                  "bytes": package_bytes(p[q])}
    out["io"] = io_contract(load_spec(p["int4"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "out" / "coreml-work")
    ap.add_argument("--ctx", type=int, default=2048, help="state context of the compared packages")
    ap.add_argument("--chunks", type=int, default=8, help="512-token held-out chunks scored (255 tokens each)")
    ap.add_argument("--parts", default="convert,parity,quality,structure")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--out", type=Path, default=benchmeta.out_path("coreml"))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    from edgellm import store

    benchmeta.start()
    result: dict = {"coreml_versions": _versions(), "ctx": args.ctx, "chunks": args.chunks}
    if "convert" in parts:
        _log("default conversion (child process)")
        c = convert_default(store.pull(quiet=True), args.work / "default" / "model.mlpackage")
        result["convert"] = c
        result["convert_seconds"], result["convert_peak_rss_gb"] = c["wall_seconds"], c["peak_rss_gb"]
    p = prepare(args.work, args.ctx, args.fresh)
    result["export_seconds"] = _read(args.work / "export_seconds.json")
    if "structure" in parts:
        s = structure(p)
        result["structure"] = s
        hist = s["int4"]["op_histogram"]
        result["sdpa_per_layer"] = hist.get("scaled_dot_product_attention", 0) / 30
        result["rope_tables_uncompressed"] = int(all(set(s[q]["compressed_consumers"]) <= {"linear", "gather"}
                                                     for q in ("int4", "int8", "palette4", "coreml_int4")))
    if "parity" in parts:
        result.update(parity(p, min(args.ctx, 1024)))
    if "quality" in parts:
        q = quality(p, args.chunks)
        result["quality"] = q
        result["int4_kld_vs_anchor"] = round(q["int4"]["mean_kld"] / q["coreml_int4"]["mean_kld"], 3)
        result["int4_size_vs_anchor"] = round(q["int4"]["size_bytes"] / q["coreml_int4"]["size_bytes"], 3)
    result["targets"] = {k: {"what": what, "bound": f"{'≥' if kind == 'min' else '≤'} {bound}", "value": result[k],
                             "pass": (result[k] >= bound) if kind == "min" else (result[k] <= bound)}
                         for k, what, kind, bound in TARGETS if k in result}
    print(benchmeta.save(result, args.out, "coreml_bench.py"))


def _versions() -> dict:
    import coremltools
    import llama_cpp

    return {"coremltools": coremltools.__version__, "numpy": np.__version__, "llama_cpp_python": llama_cpp.__version__}


if __name__ == "__main__":
    main()
