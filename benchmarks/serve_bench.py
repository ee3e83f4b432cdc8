"""edgellm serve under load: one streaming client, then 8 at once, against the same server process
(started here with `edgellm serve`, loopback), for the default batched scheduler (--batch) and the exact
one (--exact). The single-client anchor runs on the same server in the same run: the two phases alternate
for --rounds rounds so a busy machine slows both alike, and the ratio is the median of the per-round
ratios. Prints JSON: single-client and 8-client decode tok/s, their ratio (target ≥ 0.9), end-to-end
tok/s, p50/p95 time to first token (8 clients), and whether every request completed. (Isolation and
equality with single-client answers are tests, tests/test_serve.py.)

The second anchor is llama.cpp's own `llama-server`, built from the llama.cpp llama-cpp-python vendors
(benchmarks/llama_tools.py) and run on the wheel's libraries, with the same model, threads, slots
(`--parallel`), context per slot and flash attention setting (off, edgellm's CPU default). Both servers run
side by side and the phases of the two alternate within each round (order reversed every other round), so
the ratios of aggregate tok/s and TTFT percentiles compare the same moments of a shared machine.

    python benchmarks/serve_bench.py --clients 8 --max-tokens 128 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmeta  # noqa: E402

TARGET = 0.9
TARGET_VS_LLAMA_SERVER = 0.9   # edgellm serve's aggregate decode tok/s / llama-server's, same run
TOPICS = ["a dragon", "the sea", "a robot", "a lighthouse", "a mountain village", "a space station", "a baker",
          "a lost cat", "a river", "a clockmaker", "a desert", "a library"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str | None, parallel: int, mode: str, threads: int, n_ctx: int) -> tuple[subprocess.Popen, str]:
    port = _port()
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", *([model] if model else []), "--port", str(port),
           "--parallel", str(parallel), "--ctx", str(n_ctx), "--threads", str(threads), "--queue", "64"]
    # EDGELLM_OPTIMIZE=0: serve the GGUF itself through llama.cpp, the model llama-server is given
    proc = subprocess.Popen(cmd + [f"--{mode}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "EDGELLM_API_KEY": "", "EDGELLM_OPTIMIZE": "0"})
    url = f"http://127.0.0.1:{port}"
    benchmeta.wait_healthy(proc, url, "server")
    return proc, url


def start_llama_server(model: str, parallel: int, threads: int, n_ctx: int) -> tuple[subprocess.Popen, str]:
    """llama.cpp's llama-server on the same model, threads, slots and per-slot context (flash attention off,
    as edgellm runs on a CPU); returns the process and its base URL once /health answers."""
    from llama_tools import ensure_llama_tools, tool_env

    exe = ensure_llama_tools()["llama-server"]
    port = _port()
    cmd = [str(exe), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb", str(threads),
           "--parallel", str(parallel), "-c", str(n_ctx * parallel), "-fa", "off", "--no-webui", "-ngl", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=tool_env(exe))
    url = f"http://127.0.0.1:{port}"
    benchmeta.wait_healthy(proc, url, "llama-server")
    return proc, url


def one(client, topic: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    pieces, n = [], 0
    stream = client.chat.completions.create(
        model=client.model_id, messages=[{"role": "user", "content": f"Write a long story about {topic}."}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    reason, chunks = None, 0
    for chunk in stream:
        now = time.perf_counter()
        if chunk.usage:
            n = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.delta.content:
                first = first or now
                last = now
                chunks += 1
                pieces.append(c.delta.content)
            reason = c.finish_reason or reason
    n = n or chunks   # a server that sends no usage: one content chunk per token (both servers stream so)
    return {"topic": topic, "tokens": n, "ttft_s": (first or time.perf_counter()) - t0, "t0": t0,
            "first": first, "last": last, "text": "".join(pieces), "complete": reason in ("stop", "length")}


def phase(client, topics: list[str], max_tokens: int, concurrent: bool) -> dict:
    t0 = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(topics)) as pool:
            runs = list(pool.map(lambda t: one(client, t, max_tokens), topics))
    else:
        runs = [one(client, t, max_tokens) for t in topics]
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in runs)
    if concurrent:  # aggregate: all tokens after the first ones, from the first client's first token to the last end
        span = max(r["last"] for r in runs) - min(r["first"] for r in runs)
        decode = sum(r["tokens"] - 1 for r in runs) / max(1e-9, span)
    else:
        decode = sum(r["tokens"] - 1 for r in runs) / sum(r["last"] - r["first"] for r in runs)
    ttft = sorted(r["ttft_s"] for r in runs)
    return {"requests": len(runs), "completed": sum(r["complete"] for r in runs), "tokens": tokens,
            "wall_s": round(wall, 2), "end_to_end_tps": round(tokens / wall, 2), "decode_tps": round(decode, 2),
            "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))], 3),
            "texts": {r["topic"]: r["text"] for r in runs}}


def run(model: str | None, clients: int, max_tokens: int, threads: int, n_ctx: int, mode: str,
        rounds: int) -> dict:
    import openai

    proc, url = start(model, clients, mode, threads, n_ctx)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        client.model_id = client.models.list().data[0].id
        topics = TOPICS[:clients]
        one(client, "warm-up", 8)
        pairs = [(phase(client, topics[:2], max_tokens, concurrent=False),
                  phase(client, topics, max_tokens, concurrent=True)) for _ in range(rounds)]
    finally:
        proc.terminate()
        proc.wait(30)
    distinct = min(len(set(multi["texts"].values())) for _, multi in pairs)  # exactness: tests/test_serve.py
    for single, multi in pairs:
        single.pop("texts"), multi.pop("texts")
    med = statistics.median
    return {"mode": mode, "clients": clients, "max_tokens": max_tokens,
            "threads": threads, "rounds": pairs,
            "single_decode_tps": med(s["decode_tps"] for s, _ in pairs),
            "concurrent_decode_tps": med(m["decode_tps"] for _, m in pairs),
            "decode_ratio": round(med(m["decode_tps"] / s["decode_tps"] for s, m in pairs), 3),
            "end_to_end_ratio": round(med(m["end_to_end_tps"] / s["end_to_end_tps"] for s, m in pairs), 3),
            "ttft_p50_s": med(m["ttft_p50_s"] for _, m in pairs), "ttft_p95_s": med(m["ttft_p95_s"] for _, m in pairs),
            "single_ttft_p50_s": med(s["ttft_p50_s"] for s, _ in pairs),
            "all_completed": all(m["completed"] == clients for _, m in pairs),
            "distinct_answers": f"{distinct}/{clients}"}


def _summary(pairs: list[tuple[dict, dict]], clients: int) -> dict:
    med = statistics.median
    return {"single_decode_tps": med(s["decode_tps"] for s, _ in pairs),
            "concurrent_decode_tps": med(m["decode_tps"] for _, m in pairs),
            "decode_ratio": round(med(m["decode_tps"] / s["decode_tps"] for s, m in pairs), 3),
            "ttft_p50_s": med(m["ttft_p50_s"] for _, m in pairs), "ttft_p95_s": med(m["ttft_p95_s"] for _, m in pairs),
            "single_ttft_p50_s": med(s["ttft_p50_s"] for s, _ in pairs),
            "all_completed": all(m["completed"] == clients for _, m in pairs)}


def against_llama_server(model: str | None, clients: int, max_tokens: int, threads: int, n_ctx: int,
                         rounds: int) -> dict:
    """edgellm serve (default, batched) and llama-server side by side: per round, one client then `clients`
    at once on each, the two servers' order reversed every other round; per-round ratios."""
    import openai

    from edgellm import store

    path = str(store.resolve(model).path if model else store.pull(quiet=True))
    procs, clients_by = [], {}
    try:
        for name, starter in (("edgellm", lambda: start(path, clients, "batch", threads, n_ctx)),
                              ("llama-server", lambda: start_llama_server(path, clients, threads, n_ctx))):
            proc, url = starter()
            procs.append(proc)
            c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
            c.model_id = c.models.list().data[0].id
            one(c, "warm-up", 8)
            clients_by[name] = c
        topics = TOPICS[:clients]
        runs: dict[str, list[tuple[dict, dict]]] = {"edgellm": [], "llama-server": []}
        for r in range(rounds):
            for name in (("edgellm", "llama-server") if r % 2 == 0 else ("llama-server", "edgellm")):
                c = clients_by[name]
                runs[name].append((phase(c, topics[:2], max_tokens, concurrent=False),
                                   phase(c, topics, max_tokens, concurrent=True)))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    for pairs in runs.values():
        for single, multi in pairs:
            single.pop("texts"), multi.pop("texts")
    med = statistics.median
    e, ls = runs["edgellm"], runs["llama-server"]
    ratios = {
        "concurrent_decode": round(med(a[1]["decode_tps"] / b[1]["decode_tps"] for a, b in zip(e, ls)), 3),
        "single_decode": round(med(a[0]["decode_tps"] / b[0]["decode_tps"] for a, b in zip(e, ls)), 3),
        "concurrent_end_to_end": round(med(a[1]["end_to_end_tps"] / b[1]["end_to_end_tps"] for a, b in zip(e, ls)), 3),
        "ttft_p50": round(med(a[1]["ttft_p50_s"] / b[1]["ttft_p50_s"] for a, b in zip(e, ls)), 3),
        "ttft_p95": round(med(a[1]["ttft_p95_s"] / b[1]["ttft_p95_s"] for a, b in zip(e, ls)), 3),
    }
    return {"clients": clients, "max_tokens": max_tokens, "threads": threads, "ctx_per_slot": n_ctx,
            "edgellm": {**_summary(e, clients), "rounds": e},
            "llama_server": {"mode": "llama-server", "clients": clients, **_summary(ls, clients), "rounds": ls,
                             "flags": f"-t {threads} --parallel {clients} -c {n_ctx * clients} -fa off"},
            "ratios": ratios,
            "target": {"what": "edgellm serve aggregate decode tok/s / llama-server's (same run)",
                       "bound": f"≥ {TARGET_VS_LLAMA_SERVER}", "value": ratios["concurrent_decode"],
                       "pass": ratios["concurrent_decode"] >= TARGET_VS_LLAMA_SERVER}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024, help="per slot")
    ap.add_argument("--modes", default="batch,exact", help="serve's --batch (the default) and/or --exact")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-llama-server", action="store_true", help="skip the llama-server comparison")
    ap.add_argument("--out", type=Path, default=benchmeta.out_path("serve_bench"))
    args = ap.parse_args(argv)
    benchmeta.start()
    rows = [run(args.model, args.clients, args.max_tokens, args.threads, args.ctx, mode, args.rounds)
            for mode in args.modes.split(",")]
    default = next((r for r in rows if r["mode"] == "batch"), None)
    result = {"target_decode_ratio": TARGET, "runs": rows,
              "target_met_by_default": None if default is None else
              default["decode_ratio"] >= TARGET and default["all_completed"]}
    if not args.no_llama_server:
        vs = against_llama_server(args.model, args.clients, args.max_tokens, args.threads, args.ctx, args.rounds)
        result["llama_server"] = vs["llama_server"]
        result["edgellm_beside_llama_server"] = vs["edgellm"]
        result["vs_llama_server"] = vs["ratios"]
        result["vs_llama_server_target"] = vs["target"]
    print(benchmeta.save(result, args.out, "serve_bench.py", argv))


if __name__ == "__main__":
    main()
