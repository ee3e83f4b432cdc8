"""`edgellm serve`'s promises about time, over real HTTP on the real model: a request past `--timeout` gets
504 (queueing included; an error event when it is streaming), a full queue answers 503 with `Retry-After`,
and SIGTERM lets in-flight answers run for `--drain` seconds, then ends them and exits 0 — not sooner, not
much later."""
from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request

from serving import MODEL, cli_server, running, wait_health

COUNT = "1, 2, 3, 4, 5, 6, 7, 8,"   # a raw prompt the model keeps continuing: long answers on demand


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


def _wait(url: str, cond, timeout: float = 60) -> None:
    wait_health(url, cond, timeout)


def test_a_request_past_its_timeout_gets_504_and_a_stream_gets_an_error_event(default_model_path):
    long = {"model": MODEL, "prompt": COUNT, "max_tokens": 1500, "temperature": 0}
    with running(default_model_path, n_ctx=2048, parallel=1, timeout_s=1.5) as url:
        t0 = time.monotonic()
        status, _, body = _post(f"{url}/v1/completions", long)
        took = time.monotonic() - t0
        assert status == 504 and body["error"]["code"] == "timeout", (status, body)
        assert 1.4 <= took <= 15, took            # it ran until its deadline, then stopped
        # streaming: the answer starts, then an error event ends it at the deadline
        req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps({**long, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        events = []
        with urllib.request.urlopen(req, timeout=60) as r:
            for line in r:
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                    events.append(json.loads(line[6:]))
        assert any(e.get("choices") and e["choices"][0].get("text") for e in events), "no tokens before the deadline"
        assert events[-1].get("error", {}).get("code") == "timeout", events[-1]


def test_time_spent_queueing_counts_toward_the_timeout(default_model_path):
    long = {"model": MODEL, "prompt": COUNT, "max_tokens": 1500, "temperature": 0}
    with running(default_model_path, n_ctx=2048, parallel=1, timeout_s=2.0) as url:
        first = threading.Thread(target=_post, args=(f"{url}/v1/completions", long))
        first.start()
        _wait(url, lambda h: h["busy"] == 1)
        status, _, body = _post(f"{url}/v1/completions", {**long, "max_tokens": 2})   # waits behind the first
        first.join()
        assert status == 504 and body["error"]["code"] == "timeout", (status, body)


def test_a_full_queue_answers_503_with_retry_after(default_model_path):
    long = {"model": MODEL, "prompt": COUNT, "max_tokens": 400, "temperature": 0}
    with running(default_model_path, n_ctx=1024, parallel=1, max_queue=1) as url:
        threads = [threading.Thread(target=_post, args=(f"{url}/v1/completions", long))]
        threads[0].start()
        _wait(url, lambda h: h["busy"] == 1)
        threads.append(threading.Thread(target=_post, args=(f"{url}/v1/completions", {**long, "max_tokens": 2})))
        threads[1].start()
        _wait(url, lambda h: h["queued"] == 1)
        status, headers, body = _post(f"{url}/v1/completions", long)
        for t in threads:
            t.join()
    assert status == 503 and body["error"]["code"] == "queue_full"
    assert headers.get("retry-after") == "1", headers


def test_sigterm_drains_for_drain_seconds_then_ends_the_rest_and_exits_0(default_model_path):
    drain = 3.0
    args = (str(default_model_path), "--ctx", "2048", "--parallel", "1", "--drain", f"{drain:g}")
    with cli_server(*args) as (url, proc):
        req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(
            {"model": MODEL, "prompt": COUNT, "max_tokens": 1800, "temperature": 0, "stream": True}).encode(),
            headers={"Content-Type": "application/json"})
        arrivals, finish, ended = [], None, "end of stream"
        with urllib.request.urlopen(req, timeout=120) as r:
            lines = iter(r)
            for line in lines:                         # the answer is under way
                if line.startswith(b"data: {") and json.loads(line[6:]).get("choices"):
                    break
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                for line in lines:
                    if line.startswith(b"data: {"):
                        event = json.loads(line[6:])
                        if event.get("choices"):
                            arrivals.append(time.monotonic() - t_term)
                            finish = event["choices"][0].get("finish_reason") or finish
            except Exception as e:  # noqa: BLE001 - the connection may be cut when the drain ends
                ended = repr(e)
        refused = False
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
        except OSError:
            refused = True
        code = proc.wait(60)
        t_exit = time.monotonic() - t_term
    print(f"\nafter SIGTERM: {len(arrivals)} more pieces over {arrivals[-1] if arrivals else 0:.1f} s, exit at "
          f"{t_exit:.1f} s (drain {drain:g} s); the stream ended with {ended}")
    assert code == 0
    assert refused, "the server still accepted connections after SIGTERM"
    assert arrivals and arrivals[-1] >= 0.6 * drain, "the in-flight answer did not get its drain time"
    assert finish != "length", "the 1800-token answer cannot have finished within the drain"
    assert t_exit <= drain + 5, f"exited {t_exit:.1f} s after SIGTERM with --drain {drain:g}"
