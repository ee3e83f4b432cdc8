"""ONNX export and runtime against its anchors, in one run: parity with llama.cpp F32, operator fusion
(nodes and decode speed, fused vs the unfused graph: the portable decompositions with the same 4-bit
MatMulNBits matrices; F32 is reported too but is bound by memory bandwidth, not by operators), and edgellm's
calibrated int4 against onnxruntime-genai's own model builder and llama.cpp Q4_0 — decode tok/s with the
same threads, interleaved round by round, size, and KL divergence to the F32 model on held-out text. The
builder runs at its defaults (`-p int4 -e cpu`: round-to-nearest, blocks of 32) and at the settings its
current release offers for quality: block_size=64, algo_config=k_quant (llama.cpp-style k-quant rounding)
and k_quant_mixed (k-quant with the last MatMul and the most sensitive layers in int8) — see BUILDERS;
every variant is timed in onnxruntime-genai's own C++ loop. Prints JSON with a pass/fail per target,
against the defaults and against the best variant.

    pip install onnxruntime-genai          # the anchor (and torch + transformers, which its builder needs)
    python benchmarks/onnx_bench.py --threads 2 --rounds 3

Artifacts are built once under --work (default benchmarks/out/onnx) and reused; --fresh rebuilds them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmeta import out_path, save, start  # noqa: E402

PROMPT = "The three most important things to know about growing tomatoes are"
TARGETS = (  # key, description, "min"/"max", bound
    ("parity_cosine_min", "F32 ONNX vs llama.cpp F32 logits, worst cosine", "min", 0.9999),
    ("greedy64_identical", "greedy 64 tokens identical to llama.cpp F32 (both flavours)", "min", 1),
    ("fused_node_ratio", "unfused / fused node count", "min", 3.0),
    ("fused_decode_vs_unfused", "fused / unfused decode tok/s (same 4-bit blocks)", "min", 1.3),
    ("int4_decode_vs_builder", "edgellm int4 / builder int4 (in onnxruntime-genai) decode tok/s", "min", 1.0),
    ("int4_kld_vs_builder", "edgellm int4 KLD / builder int4 KLD", "max", 0.75),
    ("int4_size_vs_builder", "edgellm int4 size / builder int4 size", "max", 1.0),
    ("int4_decode_vs_fastest_builder", "edgellm int4 / the fastest builder variant (in onnxruntime-genai) decode tok/s",
     "min", 1.0),
    ("int4_kld_vs_best_builder", "edgellm int4 KLD / the builder variant with the lowest KLD", "max", 0.75),
)


# onnxruntime-genai builder variants: name -> --extra_options (on top of `-p int4 -e cpu`)
FAILED: dict[str, str] = {}   # builder variants the builder could not make: key -> its last error line
BUILDERS = {
    "builder": [],                                                     # its defaults: RTN, blocks of 32
    "builder_b64": ["block_size=64"],
    "builder_kquant": ["algo_config=k_quant"],
    "builder_kquant_b64": ["algo_config=k_quant", "block_size=64"],
    "builder_kquant_mixed": ["algo_config=k_quant_mixed"],
}


def _log(msg: str) -> None:
    print(f"[onnx_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("model.onnx*"))


def prepare(work: Path, threads: int, fresh: bool) -> dict[str, Path]:
    """Every artifact of the comparison, built from the embedded model (reused when present)."""
    from edgellm import store
    from edgellm.converters.calibrate import weight_getter
    from edgellm.converters.gguf_source import read_gguf
    from edgellm.converters.onnx_export import export_onnx, write_onnx_dir
    from edgellm.converters.onnx_graph import WeightPlan, build_graph, fused_units
    from edgellm.converters.onnx_quant import BitChoice
    from edgellm.converters.pipeline import convert

    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    src = store.pull(quiet=True)
    p = {"f32_gguf": work / "f32.gguf", "q4_0": work / "q4_0.gguf", "hf": work / "hf",
         "builder": work / "builder-int4", "fused_f32": work / "fused-f32", "portable_f32": work / "portable-f32",
         "int4": work / "edgellm-int4"}
    if not p["f32_gguf"].exists():
        _log("F32 GGUF"), convert(src, p["f32_gguf"], quant="F32")
    if not p["q4_0"].exists():  # llama.cpp's own Q4_0, as llama-quantize makes it (no importance matrix)
        _log("llama.cpp Q4_0"), convert(src, p["q4_0"], quant="Q4_0", imatrix=False)
    for key, extra in list(BUILDERS.items()):
        p[key] = p.get(key) or work / key.replace("_", "-")
        if p[key].exists() and not (p[key] / "genai_config.json").exists():
            shutil.rmtree(p[key])  # an interrupted build: the builder writes genai_config.json last
        if not p[key].exists():
            if not p["hf"].exists():
                _log("HF directory for the builder"), convert(src, p["hf"], to="hf")
            _log(f"onnxruntime-genai model builder, -p int4 -e cpu {' '.join(extra)}")
            proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(p["hf"]), "-o",
                                   str(p[key]), "-p", "int4", "-e", "cpu", "-c", str(work / "hf-cache"),
                                   *(["--extra_options", *extra] if extra else [])],
                                  check=False, capture_output=True, text=True)
            if proc.returncode != 0:  # a variant the builder cannot make is a finding, not the end of the run
                lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
                FAILED[key] = lines[-1] if lines else f"exit status {proc.returncode}"
                _log(f"the builder failed for {key}: {FAILED[key]}")
                shutil.rmtree(p[key], ignore_errors=True)
                del BUILDERS[key]
                continue
        genai = p[key] / "genai_config.json"
        cfg = json.loads(genai.read_text())
        cfg["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads, inter_op_num_threads=1)
        genai.write_text(json.dumps(cfg, indent=2))
    ckpt, weights = None, None
    for key, flavour, quant in (("fused_f32", "fused", "f32"), ("portable_f32", "portable", "f32"),
                                ("int4", "fused", "int4"), ("int4_mixed", "fused", "int4-mixed"),
                                ("fused_q4", "fused", "q4"), ("unfused_q4", "unfused", "q4")):
        p[key] = p.get(key) or work / key.replace("_", "-")
        if not p[key].exists():
            if ckpt is None:
                ckpt = read_gguf(src)
                weights = weight_getter(ckpt)
            _log(f"edgellm export {flavour} {quant}")
            if quant == "q4":  # the fusion pair: the same plain 4-bit blocks, fused ops vs their decompositions
                plan = (WeightPlan(bits={t: BitChoice(4, 64) for t in fused_units(ckpt.config)}) if flavour == "fused"
                        else WeightPlan(unfused_bits=BitChoice(4, 64)))
                graph = build_graph(ckpt.config, weights, "fused" if flavour == "fused" else "portable", plan)
                write_onnx_dir(ckpt, graph, p[key], flavour, "int4-uniform")
            else:
                export_onnx(ckpt, p[key], flavour=flavour, quant=quant, weights=weights)
    return p


def parity(p: dict[str, Path], threads: int) -> dict[str, Any]:
    import edgellm

    out: dict[str, Any] = {}
    kw = dict(n_ctx=1024, disk_cache=False, sampler=edgellm.GREEDY, threads=threads)
    with edgellm.load(p["f32_gguf"], **kw) as ref:
        tokens = ref.tokenize(PROMPT)
        want_logits = ref.backend.eval_all_logits(tokens)
        want = ref.generate(PROMPT, max_tokens=64).tokens
        for key in ("fused_f32", "portable_f32"):
            with edgellm.load(p[key], **kw) as s:
                got = s.backend.eval_all_logits(tokens)
                cos = (got * want_logits).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want_logits, axis=-1)
                s.backend.truncate(0)
                s.tokens.clear()
                gen = s.generate(PROMPT, max_tokens=64).tokens
            out[key] = {"cosine_min": float(cos.min()), "max_abs_diff": float(np.abs(got - want_logits).max()),
                        "greedy64_identical": gen == want, "tokens_compared": len(want)}
    return out


def nodes(p: dict[str, Path]) -> dict[str, Any]:
    from edgellm.converters.onnx_inspect import inspect_onnx

    out = {}
    for key in ("fused_f32", "portable_f32", "fused_q4", "unfused_q4", "int4", *BUILDERS):
        info = inspect_onnx(p[key])
        out[key] = {"nodes": info["nodes"], "ops": info["ops"], "weight_bytes": info["weight_bytes"]}
    return out


def cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy over `seconds` (/proc/stat; 0.0 where there is none)."""
    def ticks() -> list[int]:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    try:
        a = ticks()
        time.sleep(seconds)
        d = [y - x for x, y in zip(a, ticks())]
    except OSError:
        return 0.0
    return 1.0 - (d[3] + d[4]) / max(1, sum(d))


def wait_idle(limit: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until other processes leave the CPUs at most `limit` busy; returns the last
    busy fraction seen. On a shared machine a round timed under someone else's load measures the load."""
    t0 = time.perf_counter()
    while (busy := cpu_busy()) > limit and time.perf_counter() - t0 < max_wait:
        pass
    return busy


class _GenaiDecoder:
    """onnxruntime-genai's own generator loop (the builder's intended runtime), greedy after a 1-token prompt."""

    def __init__(self, path: Path) -> None:
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(path))

    def edgellm_tg(self, n: int) -> float:  # named like SpeedBench's, so both decoders are called alike
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=n + 3, do_sample=False)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens([1])  # runs the model on the prompt
        gen.generate_next_token()  # picks the first token from those logits: no model run, so not timed
        t0 = time.perf_counter()  # from here each call is one model run + one pick, as in SpeedBench.edgellm_tg
        for _ in range(n):
            gen.generate_next_token()
        return n / (time.perf_counter() - t0)

    def close(self) -> None:
        del self.model


GENAI_RUNNERS = tuple(f"{b}_in_genai" for b in BUILDERS)       # each builder variant in onnxruntime-genai's loop
RUNNERS = ("fused_f32", "portable_f32", "fused_q4", "unfused_q4", "int4", "int4_mixed", "builder_in_edgellm",
           *GENAI_RUNNERS, "llama_q4_0")
RATIOS = {"fused_vs_unfused_q4": ("fused_q4", "unfused_q4"), "fused_vs_unfused_f32": ("fused_f32", "portable_f32"),
          "int4_vs_builder_same_loop": ("int4", "builder_in_edgellm"), "int4_vs_llama_q4_0": ("int4", "llama_q4_0"),
          "int4_mixed_vs_builder_in_genai": ("int4_mixed", "builder_in_genai"),
          **{f"int4_vs_{r}": ("int4", r) for r in GENAI_RUNNERS}}


def _decoder_process(conn, path: str | None, builder: str, threads: int, n_gen: int) -> None:
    """One runner in its own process, as a user runs one model per process. With every runner loaded in
    one process, each measured ~25 % slower at 1 thread here (~88 vs ~115 tok/s). Waits for 'decode n' requests.
    `path` None: the builder output at `builder`, in onnxruntime-genai's own loop."""
    if path is None:
        dec: Any = _GenaiDecoder(Path(builder))
        dec.edgellm_tg(8)  # warm-up (SpeedBench warms itself up)
    else:
        from edgellm.bench import SpeedBench

        dec = SpeedBench(path, threads, n_prompt=32, n_gen=n_gen, anchor=False)
    conn.send("ready")
    while (n := conn.recv()) is not None:
        conn.send(dec.edgellm_tg(n))
    dec.close()


def speed(p: dict[str, Path], threads: int, rounds: int, n_gen: int,
          names: tuple[str, ...] = RUNNERS, idle: float | None = None) -> dict[str, Any]:
    """Decode tok/s, every runner once per round in its own process, the order reversed every other
    round; paired ratios."""
    import multiprocessing as mp

    from edgellm.bench import paired_ratio

    names = tuple(n for n in names if n.removesuffix("_in_genai") not in FAILED)
    paths = {"fused_f32": p["fused_f32"], "portable_f32": p["portable_f32"], "fused_q4": p["fused_q4"],
             "unfused_q4": p["unfused_q4"], "int4": p["int4"], "int4_mixed": p["int4_mixed"],
             "builder_in_edgellm": p["builder"], "llama_q4_0": p["q4_0"], **{r: None for r in GENAI_RUNNERS}}
    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    reps: dict[str, list[float]] = {k: [] for k in names}
    busy: list[float] = []
    try:
        for k in names:
            conns[k], child = ctx.Pipe()
            path = None if paths[k] is None else str(paths[k])
            builder = p[k.removesuffix("_in_genai")] if k in GENAI_RUNNERS else p["builder"]
            procs.append(ctx.Process(target=_decoder_process, args=(child, path, str(builder), threads, n_gen),
                                     daemon=True))
            procs[-1].start()
            if conns[k].recv() != "ready":  # loaded one at a time: loading does not overlap a timing
                raise RuntimeError(f"runner {k} did not start")
        for r in range(rounds):
            busy.append(round(cpu_busy() if idle is None else wait_idle(idle, max_wait=120.0), 3))
            _log(f"decode round {r + 1}/{rounds} (CPUs {busy[-1]:.0%} busy before it)")
            for k in list(names) if r % 2 == 0 else list(names)[::-1]:
                time.sleep(0.2)  # the previous runner's onnxruntime workers spin on after its last step
                conns[k].send(n_gen)
                reps[k].append(conns[k].recv())
    finally:
        for c in conns.values():
            c.send(None)
        for proc in procs:
            proc.join(timeout=30)
    return {"tps": {k: statistics.median(v) for k, v in reps.items()}, "reps": reps, "busy_before_round": busy,
            "ratios": {k: paired_ratio(reps[a], reps[b]) for k, (a, b) in RATIOS.items() if a in reps and b in reps}}


def quality(p: dict[str, Path], threads: int, chunks: int) -> dict[str, Any]:
    from edgellm.converters.evaluate import evaluate
    from edgellm.texts import heldout_text

    out = {}
    for key in ("int4", "int4_mixed", *BUILDERS, "q4_0"):
        _log(f"KLD of {key} to F32 on held-out text")
        r = evaluate(p[key], p["f32_gguf"], heldout_text(), ctx=512, threads=threads, max_chunks=chunks)
        out[key] = {"mean_kld": r.mean_kld, "p99_kld": r.p99_kld, "top1": r.top1_agreement, "ppl": r.perplexity,
                    "ref_ppl": r.ref_perplexity, "tokens_scored": r.tokens_scored, "bytes": model_bytes(p[key])}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128, help="decode tokens per rep")
    ap.add_argument("--chunks", type=int, default=8, help="512-token held-out chunks for KLD")
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "out" / "onnx")
    ap.add_argument("--fresh", action="store_true", help="rebuild every artifact")
    ap.add_argument("--out", type=Path, default=out_path("onnx_bench"))
    ap.add_argument("--parts", default="parity,nodes,speed,quality",
                    help="comma-separated subset of parity,nodes,speed,quality (targets of the others are skipped)")
    ap.add_argument("--runners", default=",".join(RUNNERS),
                    help="decoders the speed part times, e.g. int4,builder_in_genai,builder_in_edgellm")
    ap.add_argument("--wait-idle", type=float, default=None, metavar="FRACTION",
                    help="before each decode round wait (≤ 2 min) until the CPUs are at most this busy, e.g. 0.1")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    names = tuple(args.runners.split(","))
    if not parts <= {"parity", "nodes", "speed", "quality"} or not set(names) <= set(RUNNERS):
        ap.error(f"--parts takes parity,nodes,speed,quality; --runners takes {','.join(RUNNERS)}")
    start()
    p = prepare(args.work, args.threads, args.fresh)
    par = nod = spd = qual = None
    if "parity" in parts:
        _log("parity"), (par := parity(p, args.threads))
    nod = nodes(p) if "nodes" in parts else None
    spd = speed(p, args.threads, args.rounds, args.gen, names, args.wait_idle) if "speed" in parts else None
    qual = quality(p, args.threads, args.chunks) if "quality" in parts else None
    ratio = (spd or {}).get("ratios", {}).get
    figures = {
        "parity_cosine_min": par and min(v["cosine_min"] for v in par.values()),
        "greedy64_identical": par and int(all(v["greedy64_identical"] for v in par.values())),
        "fused_node_ratio": nod and nod["unfused_q4"]["nodes"] / nod["fused_q4"]["nodes"],
        "fused_decode_vs_unfused": ratio("fused_vs_unfused_q4"),
        "int4_decode_vs_builder": ratio("int4_vs_builder_in_genai"),
        "int4_kld_vs_builder": qual and qual["int4"]["mean_kld"] / qual["builder"]["mean_kld"],
        "int4_size_vs_builder": qual and qual["int4"]["bytes"] / qual["builder"]["bytes"],
        "int4_decode_vs_fastest_builder": min((v for k, v in ((spd or {}).get("ratios") or {}).items()
                                               if k.startswith("int4_vs_builder") and k.endswith("_in_genai")
                                               and v is not None), default=None),
        "int4_kld_vs_best_builder": qual and qual["int4"]["mean_kld"] / min(qual[b]["mean_kld"] for b in BUILDERS),
    }
    best = {"fastest_builder": min((k.removeprefix("int4_vs_").removesuffix("_in_genai") for k, v in
                                    ((spd or {}).get("ratios") or {}).items() if k.startswith("int4_vs_builder")
                                    and k.endswith("_in_genai") and v is not None),
                                   key=lambda b: spd["ratios"][f"int4_vs_{b}_in_genai"], default=None),
            "lowest_kld_builder": qual and min(BUILDERS, key=lambda b: qual[b]["mean_kld"])}
    targets = {k: {"what": what, "value": figures[k], "bound": f"{'≥' if how == 'min' else '≤'} {bound}",
                   "met": figures[k] >= bound if how == "min" else figures[k] <= bound}
               for k, what, how, bound in TARGETS if figures[k] is not None}
    import onnxruntime
    result = {"threads": args.threads, "rounds": args.rounds, "n_gen": args.gen, "kld_chunks": args.chunks,
              "parts": sorted(parts), "builder_variants": BUILDERS, "builder_failed": FAILED, "best_builder": best,
              "onnxruntime": onnxruntime.__version__, "parity": par, "nodes": nod, "speed": spd, "quality": qual,
              "targets": targets}
    print(save(result, args.out, "onnx_bench.py", argv))
    return 0 if all(t["met"] for t in targets.values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
