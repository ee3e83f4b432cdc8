"""Short chat requests one at a time vs eight at once against `edgellm serve`, on a quiet machine and beside one
busy process, with the default thread choice and with pinned thread counts.

Why (issue 13, docs/reliability.md): concurrent requests looked slower than sequential ones on a loaded machine.
The cause is thread oversubscription (a llama.cpp step waits at a barrier for its slowest thread), not the server;
this script shows it and checks that the default thread choice (which leaves busy cores alone) avoids it.

    python benchmarks/concurrency_bench.py            # writes benchmarks/out/concurrency_bench.json

Each case starts its own server in a subprocess (`serve --parallel 8 --no-disk-cache`, EDGELLM_OPTIMIZE=0: the
GGUF through llama.cpp). The busy process is `yes > /dev/null` started before the server, as a user's other work.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmeta  # noqa: E402

# (name, busy process beside the server, EDGELLM_THREADS or None for edgellm's default choice, requests)
CASES = (("quiet, default threads", False, None, 40),
         ("quiet, 2 threads", False, "2", 40),
         ("busy, default threads", True, None, 40),
         ("busy, 1 thread", True, "1", 40),
         ("busy, 2 threads", True, "2", 8))   # 30x slower: fewer requests keep the run short


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(url: str, i: int) -> int:
    body = json.dumps({"messages": [{"role": "user", "content": f"Say a number near {i}."}], "max_tokens": 16,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["usage"]["completion_tokens"]


def case(busy: bool, threads: str | None, n: int) -> dict:
    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if busy else None
    if hog:
        time.sleep(0.5)
    env = {**os.environ, "EDGELLM_OPTIMIZE": "0", "EDGELLM_API_KEY": ""}
    env.pop("EDGELLM_THREADS", None)
    if threads:
        env["EDGELLM_THREADS"] = threads
    port = _port()
    srv = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", "--port", str(port), "--parallel", "8",
                            "--queue", "64", "--no-disk-cache"], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        benchmeta.wait_healthy(srv, url, timeout=300)
        info = json.loads(urllib.request.urlopen(url + "/v1/edgellm/info", timeout=10).read())
        _ask(url, 0)
        out = {"threads": (info.get("plan") or {}).get("threads"), "requests": n}
        for conc in (1, 8):
            t = time.perf_counter()
            with ThreadPoolExecutor(conc) as pool:
                tokens = sum(pool.map(lambda i: _ask(url, i), range(n)))
            out[f"concurrency_{conc}_s"] = round(time.perf_counter() - t, 2)
            out[f"concurrency_{conc}_tokens"] = tokens
        out["speedup_8_vs_1"] = round(out["concurrency_1_s"] / out["concurrency_8_s"], 2)
        return out
    finally:
        srv.terminate()
        srv.wait(30)
        if hog:
            hog.kill()
            hog.wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=benchmeta.out_path("concurrency_bench"))
    args = ap.parse_args(argv)
    benchmeta.start()
    rows = {}
    for name, busy, threads, n in CASES:
        rows[name] = case(busy, threads, n)
        print(name, rows[name], file=sys.stderr, flush=True)
    per_req = {k: v["concurrency_1_s"] / v["requests"] for k, v in rows.items()}
    result = {"cases": rows, "seconds_per_request_one_at_a_time": {k: round(v, 3) for k, v in per_req.items()},
              "targets": {
                  "concurrency_helps_quiet": {"what": "8 at once vs one at a time, quiet, default threads",
                                              "bound": "≥ 1.2", "value": rows["quiet, default threads"][
                                                  "speedup_8_vs_1"],
                                              "pass": rows["quiet, default threads"]["speedup_8_vs_1"] >= 1.2},
                  "default_survives_a_busy_core": {
                      "what": "per-request time one at a time: busy with default threads / quiet",
                      "bound": "≤ 2.0",
                      "value": round(per_req["busy, default threads"] / per_req["quiet, default threads"], 2),
                      "pass": per_req["busy, default threads"] / per_req["quiet, default threads"] <= 2.0}}}
    print(benchmeta.save(result, args.out, "concurrency_bench.py", argv))


if __name__ == "__main__":
    main()
