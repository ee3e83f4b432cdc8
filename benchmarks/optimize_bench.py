"""`edgellm optimize` against llama-bench: the time optimize takes, the quality of each candidate, and the chosen
path's decode and prefill against llama.cpp's own llama-bench on the shipped GGUF, in the same run.

Per round (interleaved, `--rounds`): llama-bench on the GGUF file (built from the llama.cpp that llama-cpp-python
vendors, benchmarks/llama_bench.py) with flash attention off and on — `tg` at the chat's KV depth, `pp512` into an
empty cache, `tg` after 768 tokens — then every candidate timed the way optimize times it (a streamed chat's decode
tok/s, a 512-token prefill into an empty cache, greedy decode after 768 tokens). Ratios are per round, then the
median. The speed targets take llama-bench at its best flash-attention setting in that round (the peer as a user
would tune it); the chat-overhead target compares each llama.cpp candidate with llama-bench at its own setting
(same kernel, so what remains is edgellm's per-token cost). Targets (issue 18): lossless (KLD ≤ 0.005) decode
≥ 1.5x llama-bench, balanced (KLD ≤ 0.05) ≥ 2.0x, prefill ≥ 1.0x pp512, optimize ≤ 90 s, and the llama.cpp path's
chat decode ≥ 0.97x llama-bench tg. The bandwidth ceiling is what this machine's memory can stream over each
candidate's bytes.
Then the runtime's TTFT targets on each chosen path (edgellm.bench.measure_ttft: warm ≤ 10 %, after a restart
≤ 20 %, shipped system-prompt state ≤ 25 % of cold), with the GGUF on llama.cpp measured the same way beside it.

    python benchmarks/optimize_bench.py --threads 2 --rounds 3      # writes benchmarks/out/optimize_bench.json
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmeta  # noqa: E402
from llama_bench import ensure_llama_bench, run_llama_bench  # noqa: E402

TARGETS = {"lossless": 1.5, "balanced": 2.0}
TTFT_TARGETS = {"warm_vs_cold": 0.10, "restart_vs_cold": 0.20, "shipped_vs_without": 0.25}
CHAT_DEPTH = 80   # optimize's timing chat: ~30 prompt tokens, then 96 decoded; the mean KV depth while decoding


def _log(msg: str) -> None:
    print(f"[optimize_bench] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF [default: the embedded SmolLM2-135M]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm", action="store_true", help="keep the built candidates (optimize then only measures)")
    ap.add_argument("--out", type=Path, default=benchmeta.out_path("optimize_bench"))
    args = ap.parse_args(argv)
    benchmeta.start()
    from edgellm import store
    from edgellm.bench import measure_bandwidth, measure_ttft
    from edgellm.optimize import DEEP_DECODE, DEEP_TOKENS, PREFILL_TOKENS, _fingerprint, _time, _work_dir, optimize

    gguf = store.resolve(args.model).path
    exe = ensure_llama_bench()
    decisions = {}
    fp = _fingerprint(gguf)
    for quality in TARGETS:   # cold: the candidates are built again, as on a first `edgellm chat`
        if not args.warm:
            shutil.rmtree(_work_dir(fp, quality), ignore_errors=True)
    for quality in TARGETS:
        _log(f"edgellm optimize --quality {quality} --force")
        t0 = time.perf_counter()
        d = optimize(str(gguf), quality=quality, threads=args.threads, force=True, progress=_log)
        decisions[quality] = {"seconds": round(time.perf_counter() - t0, 1), "winner": d.winner,
                              "others_cpu_share": d.load,
                              "candidates": [{"name": c.name, "size_mb": round(c.size_bytes / 1e6, 1),
                                              "mean_kld": c.mean_kld, "excluded": c.excluded,
                                              "decode_tps": c.decode_tps, "prefill_tps": c.prefill_tps,
                                              "deep_decode_tps": c.deep_decode_tps,
                                              "turn_prefill_s": c.turn_prefill_s,
                                              "conversation_tps": round(c.conversation_tps, 1)}
                                             for c in d.candidates]}
    paths = {c["name"]: (c, next(x for x in optimize(str(gguf), quality=q, threads=args.threads).candidates
                                 if x.name == c["name"]))
             for q, dec in decisions.items() for c in dec["candidates"] if c["excluded"] is None}
    rounds = []
    for r in range(args.rounds):
        _log(f"round {r + 1}/{args.rounds}: llama-bench (flash attention off, on), then each candidate")
        row = {}
        for fa in (False, True):
            def lb(n_prompt: int, n_gen: int, depth: int, fa: bool = fa) -> dict:
                return run_llama_bench(gguf, args.threads, n_prompt=n_prompt, n_gen=n_gen, reps=1, binary=exe,
                                       flash_attn=fa, depth=depth)

            row[f"llama_bench_fa{int(fa)}"] = {"tg_tps": lb(0, 96, CHAT_DEPTH)["tg_tps"],
                                               "pp512_tps": lb(PREFILL_TOKENS, 0, 0)["pp_tps"],
                                               "deep_tg_tps": lb(0, DEEP_DECODE, DEEP_TOKENS)["tg_tps"]}
        row["llama_bench_best"] = {k: max(row["llama_bench_fa0"][k], row["llama_bench_fa1"][k])
                                   for k in row["llama_bench_fa0"]}
        for name, (_, cand) in list(paths.items())[::1 if r % 2 == 0 else -1]:
            row[name] = asdict(_time(cand.path, args.threads, cand.flash_attn))
            row[name]["conversation_tps"] = round(replace(cand, **row[name]).conversation_tps, 1)
        rounds.append(row)
    med = statistics.median

    def ratio(name: str, figure: str, anchor: str, key: str) -> float:
        return round(med(x[name][figure] / x[anchor][key] for x in rounds), 3)

    ratios = {name: {"decode_vs_llama_bench": ratio(name, "decode_tps", "llama_bench_best", "tg_tps"),
                     "prefill_vs_pp512": ratio(name, "prefill_tps", "llama_bench_best", "pp512_tps"),
                     "deep_decode_vs_llama_bench": ratio(name, "deep_decode_tps", "llama_bench_best", "deep_tg_tps")}
              for name in paths}
    # what optimize ranks by, over all rounds: how much slower than the best candidate is each decision's pick
    # (its own two timing rounds can fall in a slow minute; candidates within a few % are a toss-up)
    whole_turns = {name: med(x[name]["conversation_tps"] for x in rounds) for name in paths}
    for dec in decisions.values():
        best = max((n for n in whole_turns if n in {c["name"] for c in dec["candidates"]}), key=whole_turns.get)
        dec["whole_turns_tps_median"] = {n: whole_turns[n] for n in whole_turns
                                         if n in {c["name"] for c in dec["candidates"]}}
        dec["chosen_vs_best_whole_turns"] = round(whole_turns[dec["winner"]] / whole_turns[best], 3)
    same_kernel = {name: ratio(name, "decode_tps", f"llama_bench_fa{int(bool(cand.flash_attn))}", "tg_tps")
                   for name, (_, cand) in paths.items() if cand.backend == "llama.cpp"}
    bw = measure_bandwidth(args.threads)["bandwidth_gbs"]
    ceiling = {name: {"ceiling_tps": round(bw * 1e9 / (c["size_mb"] * 1e6), 1),
                      "pct_of_ceiling": round(100 * med(x[name]["decode_tps"] for x in rounds)
                                              / (bw * 1e9 / (c["size_mb"] * 1e6)), 1)}
               for name, (c, _) in paths.items()}
    targets = {}
    for quality, bound in TARGETS.items():
        w = decisions[quality]["winner"]
        targets[f"{quality}_decode"] = {"what": f"{quality}: the chosen path ({w}) decode / llama-bench tg",
                                        "bound": f"≥ {bound}", "value": ratios[w]["decode_vs_llama_bench"],
                                        "pass": ratios[w]["decode_vs_llama_bench"] >= bound}
        targets[f"{quality}_prefill"] = {"what": f"{quality}: the chosen path prefill / llama-bench pp512",
                                         "bound": "≥ 1.0", "value": ratios[w]["prefill_vs_pp512"],
                                         "pass": ratios[w]["prefill_vs_pp512"] >= 1.0}
        targets[f"{quality}_optimize_seconds"] = {"what": f"edgellm optimize --quality {quality}"
                                                  + (" (candidates already built)" if args.warm else " (cold)"),
                                                  "bound": "≤ 90",
                                                  "value": decisions[quality]["seconds"],
                                                  "pass": decisions[quality]["seconds"] <= 90}
    for name, value in same_kernel.items():
        targets[f"{name}_chat_decode"] = {
            "what": f"{name}: a streamed chat's decode / llama-bench tg at the chat's KV depth, same flash attention",
            "bound": "≥ 0.97", "value": value, "pass": value >= 0.97}
    ttft = {}
    for name in dict.fromkeys(["llama.cpp", *(d["winner"] for d in decisions.values())]):
        _log(f"TTFT cold / warm / restart / shipped state on {name}")
        cand = paths[name][1]
        ttft[name] = {k: v for k, v in measure_ttft(cand.path, threads=args.threads, repetitions=args.rounds,
                                                    flash_attn=cand.flash_attn, progress=_log).items() if k != "reps"}
    for name in ttft:
        if name == "llama.cpp":
            continue
        for key, bound in TTFT_TARGETS.items():
            targets[f"{name}_ttft_{key}"] = {"what": f"{name}: TTFT {key.replace('_', ' ')}", "bound": f"≤ {bound}",
                                             "value": ttft[name][key], "pass": ttft[name][key] <= bound}
    result = {"threads": args.threads, "cold": not args.warm, "kv_depth": CHAT_DEPTH, "model": str(gguf),
              "decisions": decisions,
              "rounds": rounds, "ratios": ratios, "bandwidth_gbs": round(bw, 2), "ceiling": ceiling,
              "ttft": ttft, "targets": targets}
    print(benchmeta.save(result, args.out, "optimize_bench.py", argv))


if __name__ == "__main__":
    main()
