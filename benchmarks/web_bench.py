"""The chat page's first-token latency against the API's, for the same request, on one `edgellm serve` process.

Each round sends one question through the page (Debian's chromium, headless, driven by Playwright) and the
same request body (captured from the page's own request) through plain HTTP, alternating which goes first.
The two differ only in one character of the system prompt ("Session 3a." / "Session 3b."), so neither
reuses the other's KV cache: both evaluate the whole prompt (the token counts are checked equal).

- page: from the Enter key press (a capture-phase listener) to the first answer text in the page's DOM
  (a MutationObserver), both on the page's performance.now() clock;
- API: from sending the HTTP request to the first non-empty content delta parsed (Python's http.client);
- server: the engine's own TTFT from the answer's `stats` (no HTTP), for both.

Prints JSON and writes it to benchmarks/out/web_bench.json (benchmeta: with the command, machine and load):
per-round figures, medians, the ratio median(page) / median(API) (target ≤ 1.2), each path's time above the
engine's TTFT, the page's weight (target ≤ 300 KB). --screenshot PATH also saves a picture of the page.

    flock /tmp/edgellm-heavy.lock python benchmarks/web_bench.py --rounds 9 --screenshot docs/web-chat.png
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchmeta

TARGET = 1.2
WEIGHT_TARGET = 300_000
QUESTION = ("In one sentence: what is a KV cache in a language model, and why does reusing it between the turns "
            "of a chat make answers start sooner?")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
HOOKS = """() => {
    window.__t = {};
    document.addEventListener('keydown', e => {
        if (e.key === 'Enter' && !e.shiftKey && e.target.id === 'input') window.__t = {sent: performance.now()};
    }, true);
    new MutationObserver(() => {
        if (window.__t.first || !window.__t.sent) return;
        const a = [...document.querySelectorAll('article.assistant .body')].pop();
        if (a && a.textContent.length) window.__t.first = performance.now();
    }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, threads: int | None, parallel: int) -> tuple[subprocess.Popen, str]:
    port = _port()
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", *([model] if model else []), "--port", str(port),
           "--parallel", str(parallel), "--ctx", "2048", *(["--threads", str(threads)] if threads else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "EDGELLM_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    benchmeta.wait_healthy(proc, url, "server")
    return proc, url


def api_ttft(url: str, body: dict) -> tuple[float, dict]:
    """Client-side time to the first content, and the answer's server stats."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    data = json.dumps(body)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
    r = conn.getresponse()
    first, stats = None, None
    for line in r:
        if not line.startswith(b"data: {"):
            continue
        msg = json.loads(line[6:])
        if first is None and any(c["delta"].get("content") for c in msg.get("choices", [])):
            first = time.perf_counter() - t0
        stats = msg.get("stats") or stats
    conn.close()
    return first * 1000, stats


def page_round(page, system: str, max_tokens: int) -> tuple[float, dict, dict]:
    page.click("#new-chat")
    page.click("#settings-toggle")
    page.fill("#set-system", system)
    page.fill("#set-temperature", "0")
    page.fill("#set-max_tokens", str(max_tokens))
    page.click("#settings-toggle")
    page.evaluate("window.__t = {}")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as req:
        page.fill("#input", QUESTION)
        page.press("#input", "Enter")
    page.wait_for_function("() => { const a = [...document.querySelectorAll('article.assistant')].pop();"
                           " return a && a.dataset.state !== 'streaming'; }", timeout=600_000)
    t = page.evaluate("window.__t")
    store = page.evaluate("JSON.parse(localStorage.getItem('edgellm.chats.v1'))")
    chat = next(c for c in store["chats"] if c["id"] == store["current"])
    return t["first"] - t["sent"], chat["messages"][-1]["stats"], json.loads(req.value.post_data)


def screenshot(browser, url: str, path: Path) -> None:
    """The page as a user sees it, in a fresh browser profile: two short conversations, then a two-turn one (the
    second turn reuses the first's KV cache), the info panel open."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready]", state="attached", timeout=60_000)
    page.click("#settings-toggle")
    page.fill("#set-temperature", "0")
    page.fill("#set-max_tokens", "64")
    page.click("#settings-toggle")
    for i, question in enumerate(("Name three fruits.", "Say hello in French.", "What is a Raspberry Pi?",
                                  "Write a short Python function that adds two numbers.")):
        if 0 < i < 3:
            page.click("#new-chat")
            page.click("#settings-toggle")
            page.fill("#set-temperature", "0")
            page.fill("#set-max_tokens", "64")
            page.click("#settings-toggle")
        page.fill("#input", question)
        page.press("#input", "Enter")
        page.wait_for_function("() => [...document.querySelectorAll('article.assistant')].pop()?.dataset.state"
                               " !== 'streaming'", timeout=600_000)
    page.click("#info-toggle")
    page.wait_for_timeout(300)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    page.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parallel", type=int, default=4, help="server slots (edgellm serve's default)")
    ap.add_argument("--rounds", type=int, default=7, help="0: only the screenshot")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--chromium", default=os.environ.get("EDGELLM_CHROMIUM", "/usr/bin/chromium"))
    ap.add_argument("--screenshot", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=benchmeta.out_path("web_bench"))
    args = ap.parse_args()
    benchmeta.start()

    from playwright.sync_api import sync_playwright

    from edgellm.server.web import page_weight

    proc, url = start_server(args.model, args.threads, args.parallel)
    rounds = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            version = browser.version
            if args.screenshot:
                screenshot(browser, url, args.screenshot)
            if not args.rounds:
                browser.close()
                print(json.dumps({"screenshot": str(args.screenshot), "chromium": version}))
                return
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready]", state="attached", timeout=60_000)
            page.evaluate(HOOKS)
            # warm-up (first request of the process, first page render): not counted
            page_round(page, "Session warm-up.", args.max_tokens)
            for r in range(args.rounds):
                def via_page(r=r):
                    return page_round(page, f"Session {r}a.", args.max_tokens)

                def via_api(body, r=r):
                    b = {**body, "messages": [{"role": "system", "content": f"Session {r}b."}, *body["messages"][1:]]}
                    return api_ttft(url, b)

                if r % 2 == 0:
                    pg, pg_stats, body = via_page()
                    api, api_stats = via_api(body)
                else:  # the API first: needs the page's body shape, which every round has
                    body = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": QUESTION}],
                            "temperature": 0, "max_tokens": args.max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}}
                    api, api_stats = via_api(body)
                    pg, pg_stats, sent = via_page()
                    assert {k: v for k, v in sent.items() if k != "messages"} == \
                        {k: v for k, v in body.items() if k != "messages"}, sent
                assert pg_stats["prompt_tokens"] == api_stats["prompt_tokens"], (pg_stats, api_stats)
                assert pg_stats["reused_tokens"] < 8 and api_stats["reused_tokens"] < 8  # both cold
                rounds.append({"page_ms": round(pg, 1), "api_ms": round(api, 1),
                               "server_ttft_ms_page": pg_stats["ttft_ms"], "server_ttft_ms_api": api_stats["ttft_ms"],
                               "prompt_tokens": api_stats["prompt_tokens"], "order": "page,api" if r % 2 == 0 else
                               "api,page"})
            browser.close()
    finally:
        proc.terminate()
        proc.wait(60)
    page_med = statistics.median(r["page_ms"] for r in rounds)
    api_med = statistics.median(r["api_ms"] for r in rounds)
    ratio, weight = page_med / api_med, page_weight()
    result = {
        "question_tokens": rounds[0]["prompt_tokens"], "server_threads": args.threads or "default",
        "chromium": version, "rounds": rounds,
        "page_first_token_ms_median": round(page_med, 1), "api_first_token_ms_median": round(api_med, 1),
        "server_ttft_ms_median": round(statistics.median(
            x for r in rounds for x in (r["server_ttft_ms_page"], r["server_ttft_ms_api"])), 1),
        "ratio_page_over_api": round(ratio, 3),
        "ratio_per_round_median": round(statistics.median(r["page_ms"] / r["api_ms"] for r in rounds), 3),
        # what each path adds to the engine's own TTFT (HTTP, SSE parsing, and for the page, rendering): the
        # part of the ratio that is the page's doing, independent of how fast the model ran that round
        "page_overhead_ms_median": round(statistics.median(r["page_ms"] - r["server_ttft_ms_page"] for r in rounds), 1),
        "api_overhead_ms_median": round(statistics.median(r["api_ms"] - r["server_ttft_ms_api"] for r in rounds), 1),
        "target": TARGET, "meets_target": ratio <= TARGET, "page_weight_bytes": weight,
        "targets": {
            "first_token": {"what": "first token in the page / over the API, same request (medians)",
                            "bound": f"≤ {TARGET}", "value": round(ratio, 3), "pass": ratio <= TARGET},
            "page_weight": {"what": "page weight, all files uncompressed (bytes)", "bound": f"≤ {WEIGHT_TARGET}",
                            "value": weight, "pass": weight <= WEIGHT_TARGET}},
    }
    print(benchmeta.save(result, args.out, "web_bench.py"))

if __name__ == "__main__":
    main()
