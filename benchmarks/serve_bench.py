"""edgellm serve under load: one streaming client, then 8 at once, against the same server process
(started here with `edgellm serve`, loopback), for the default batched scheduler (--batch) and the exact
one (--exact). The single-client anchor runs on the same server in the same run: the two phases alternate
for --rounds rounds so a busy machine slows both alike, and the ratio is the median of the per-round
ratios. Prints JSON: single-client and 8-client decode tok/s, their ratio (target ≥ 0.9), end-to-end
tok/s, p50/p95 time to first token (8 clients), and whether every request completed. (Isolation and
equality with single-client answers are tests, tests/test_serve.py.)

    flock /tmp/edgellm-heavy.lock python benchmarks/serve_bench.py --clients 8 --max-tokens 128 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

TARGET = 0.9
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
    proc = subprocess.Popen(cmd + [f"--{mode}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "EDGELLM_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).close()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"server did not start: {proc.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.1)


def one(client, topic: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    pieces, n = [], 0
    stream = client.chat.completions.create(
        model=client.model_id, messages=[{"role": "user", "content": f"Write a long story about {topic}."}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    reason = None
    for chunk in stream:
        now = time.perf_counter()
        if chunk.usage:
            n = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.delta.content:
                first = first or now
                last = now
                pieces.append(c.delta.content)
            reason = c.finish_reason or reason
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
        decode = sum(r["tokens"] - 1 for r in runs) / max(1e-9, max(r["last"] for r in runs) - min(r["first"] for r in runs))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024, help="per slot")
    ap.add_argument("--modes", default="batch,exact", help="serve's --batch (the default) and/or --exact")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = [run(args.model, args.clients, args.max_tokens, args.threads, args.ctx, mode, args.rounds)
            for mode in args.modes.split(",")]
    default = next((r for r in rows if r["mode"] == "batch"), None)
    print(json.dumps({"target_decode_ratio": TARGET, "runs": rows,
                      "target_met_by_default": None if default is None else
                      default["decode_ratio"] >= TARGET and default["all_completed"]}, indent=2))


if __name__ == "__main__":
    main()
