"""edgellm's runtime against its anchors, in one process, interleaved round by round:
llama.cpp's C++ llama-bench (pp/tg, -r 1 per round), edgellm's backend pp/tg and chat-session decode,
and raw llama-cpp-python's high-level generate loop. Then, once, the TTFT / KV-cache figures and the
memory-bandwidth ceiling. Prints JSON (or a README-ready Markdown table) with a pass/fail per target.

    python benchmarks/runtime_bench.py --threads 2 --rounds 5          # writes benchmarks/out/runtime_bench.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmeta  # noqa: E402
from llama_bench import ensure_llama_bench, run_llama_bench  # noqa: E402

# (key, description, how to read the value, bound): ≥ bound for speeds, ≤ bound for TTFT shares
TARGETS = (
    ("decode_vs_llama_bench", "edgellm decode vs llama-bench tg", "min", 0.97),
    ("decode_vs_generate", "edgellm decode vs llama-cpp-python generate()", "min", 1.10),
    ("prompt_vs_llama_bench", "edgellm prompt eval vs llama-bench pp", "min", 0.95),
    ("ttft_warm_vs_cold", "TTFT warm in-process / cold", "max", 0.10),
    ("ttft_restart_vs_cold", "TTFT after restart (disk cache) / cold", "max", 0.20),
    ("ttft_shipped_vs_without", "TTFT first question with shipped state / without", "max", 0.25),
    # a decoder cannot read its weights faster than memory allows: over 100 % means the ceiling is wrong
    ("edgellm_pct_of_ceiling", "edgellm decode, % of the bandwidth ceiling", "max", 100),
    ("llama_bench_pct_of_ceiling", "llama-bench decode, % of the bandwidth ceiling", "max", 100),
)


def _log(msg: str) -> None:
    print(f"[runtime_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(threads: int, rounds: int, n_prompt: int, n_gen: int, history_tokens: int,
        flash_attn: bool | None = None) -> dict[str, Any]:
    from edgellm import store
    from edgellm.bench import SpeedBench, decode_ceiling, measure_ttft, paired_ratio, peak_rss_mb

    model = store.pull(quiet=True)
    exe = ensure_llama_bench()
    runs: list[dict[str, Any]] = []
    with SpeedBench(model, threads, n_prompt, n_gen, anchor=True, flash_attn=flash_attn) as sb:
        for r in range(rounds):  # llama-bench goes first on even rounds, last on odd ones
            _log(f"round {r + 1}/{rounds}")
            if r % 2 == 0:
                runs.append(run_llama_bench(model, threads, n_prompt, n_gen, 1, exe, sb.fa_on))
            sb.round(r)
            if r % 2 == 1:
                runs.append(run_llama_bench(model, threads, n_prompt, n_gen, 1, exe, sb.fa_on))
        speed, e, fa_on = sb.summary(), sb.reps, sb.fa_on
    lb = {"pp": [x["pp_tps"] for x in runs], "tg": [x["tg_tps"] for x in runs]}
    _log("TTFT and KV-cache figures")
    ttft = measure_ttft(model, threads=threads, history_tokens=history_tokens, n_gen=n_gen, repetitions=rounds,
                        system_tokens=min(400, history_tokens), flash_attn=flash_attn, progress=_log)
    rss = peak_rss_mb()
    _log("memory bandwidth")
    ceiling = decode_ceiling(model, threads, n_gen)
    ceiling_tps = ceiling["ceiling_tps"]
    med = statistics.median
    measured = {
        "decode_vs_llama_bench": paired_ratio(e["tg"], lb["tg"]),
        "decode_vs_generate": paired_ratio(e["tg"], e["anchor_tg"]),
        "prompt_vs_llama_bench": paired_ratio(e["pp"], lb["pp"]),
        "ttft_warm_vs_cold": ttft["warm_vs_cold"],
        "ttft_restart_vs_cold": ttft["restart_vs_cold"],
        "ttft_shipped_vs_without": ttft["shipped_vs_without"],
        "edgellm_pct_of_ceiling": 100 * speed["tg_tps"] / ceiling_tps,
        "llama_bench_pct_of_ceiling": 100 * med(lb["tg"]) / ceiling_tps,
    }
    targets = []
    for key, what, kind, bound in TARGETS:
        value = measured[key]
        ok = value is not None and (value >= bound if kind == "min" else value <= bound)
        targets.append({"target": key, "what": what, "bound": f"{'≥' if kind == 'min' else '≤'} {bound:g}",
                        "value": value, "pass": ok})
    return {
        "model": str(model), "threads": threads, "rounds": rounds,
        "settings": {"n_prompt": n_prompt, "n_gen": n_gen, "history_tokens": history_tokens},
        "flash_attn": fa_on,
        "llama_bench": {"pp_tps": med(lb["pp"]), "tg_tps": med(lb["tg"]), "build_commit": runs[-1]["build_commit"],
                        "binary": str(exe)},
        "edgellm": {"pp_tps": speed["pp_tps"], "tg_tps": speed["tg_tps"],
                    "session_decode_tps": speed["session_decode_tps"]},
        "llama_cpp_python": speed["anchor"],
        "extra_ratios": {"session_decode_vs_llama_bench": paired_ratio(e["session_decode"], lb["tg"]),
                         "generate_vs_llama_bench": paired_ratio(e["anchor_tg"], lb["tg"]),
                         "pp_vs_llama_cpp_python": speed["ratios"]["pp_vs_anchor"]},
        "ttft": {k: v for k, v in ttft.items() if k != "reps"},
        "peak_rss_mb": rss, **ceiling,
        "pct_of_ceiling": {"edgellm": 100 * speed["tg_tps"] / ceiling_tps,
                           "llama_bench": 100 * med(lb["tg"]) / ceiling_tps},
        "targets": targets,
        "reps": {"llama_bench_pp": lb["pp"], "llama_bench_tg": lb["tg"], **e, "ttft": ttft["reps"]},
    }


def markdown(r: dict[str, Any]) -> str:
    """The README table: speeds against both anchors, TTFT shares, and each target's verdict."""
    e, lb, py, t = r["edgellm"], r["llama_bench"], r["llama_cpp_python"], r["ttft"]
    s = r["settings"]
    lines = [
        f"SmolLM2-135M Q4_1, {r['threads']} threads, flash attention {'on' if r['flash_attn'] else 'off'} "
        f"for all three, median of {r['rounds']} interleaved rounds.",
        "",
        "| measure | edgellm | llama-bench (C++) | llama-cpp-python generate() |",
        "|---|---:|---:|---:|",
        f"| prompt pp{s['n_prompt']} (tok/s) | {e['pp_tps']:.1f} | {lb['pp_tps']:.1f} | {py['pp_tps']:.1f} |",
        f"| decode tg{s['n_gen']} (tok/s) | {e['tg_tps']:.1f} | {lb['tg_tps']:.1f} | {py['tg_tps']:.1f} |",
        f"| decode in a chat session (tok/s) | {e['session_decode_tps']:.1f} | | |",
        f"| share of the bandwidth ceiling ({r['ceiling_tps']:.0f} tok/s at "
        f"{r['bandwidth']['bandwidth_gbs']:.1f} GB/s) | {r['pct_of_ceiling']['edgellm']:.0f}% "
        f"| {r['pct_of_ceiling']['llama_bench']:.0f}% | |",
        "",
        f"| time to first token ({t['cold_prompt_tokens']:.0f}-token chat; "
        f"{t['system_prompt_tokens']}-token system prompt) | ms |",
        "|---|---:|",
        f"| cold | {t['cold_s'] * 1000:.0f} |",
        f"| warm, in process | {t['warm_s'] * 1000:.0f} |",
        f"| after a restart, from the disk cache | {t['restart_s'] * 1000:.0f} |",
        f"| first question, no system-prompt state | {t['without_state_s'] * 1000:.0f} |",
        f"| first question, shipped system-prompt state | {t['shipped_state_s'] * 1000:.0f} |",
        "",
        "| target | bound | measured | |",
        "|---|---:|---:|---|",
    ]
    for tg in r["targets"]:
        value = "–" if tg["value"] is None else f"{tg['value']:.3f}"
        lines.append(f"| {tg['what']} | {tg['bound']} | {value} | {'pass' if tg['pass'] else 'FAIL'} |")
    lines += ["", f"Peak RSS {r['peak_rss_mb']:.0f} MB (benchmark process), "
              f"{t['restart_peak_rss_mb']:.0f} MB (a restarted chat process)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    ap.add_argument("--prompt", type=int, default=512, help="pp tokens (default 512)")
    ap.add_argument("--gen", type=int, default=128, help="tg tokens (default 128)")
    ap.add_argument("--history", type=int, default=1000, help="chat history tokens for TTFT (default 1000)")
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp flash attention for every engine (default auto, edgellm.load's default)")
    ap.add_argument("--out", type=Path, default=benchmeta.out_path("runtime_bench"),
                    help="write the JSON to this file (default benchmarks/out/runtime_bench.json)")
    ap.add_argument("--markdown", action="store_true",
                    help="print a README-ready Markdown table instead of the JSON (use --out to keep the JSON)")
    args = ap.parse_args(argv)
    fa = {"auto": None, "on": True, "off": False}[args.flash_attn]
    benchmeta.start()
    result = run(args.threads, args.rounds, args.prompt, args.gen, args.history, fa)
    text = benchmeta.save(result, args.out, "runtime_bench.py", argv)
    print(markdown(result) if args.markdown else text)


if __name__ == "__main__":
    main()
