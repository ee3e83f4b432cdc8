"""The chat page of `edgellm serve` (and `edgellm chat --web`), driven in Debian's real chromium (headless, through
Playwright) against a real server on the real default model; plus the server additions the page uses
(GET /v1/edgellm/info, POST /v1/edgellm/cancel/{id}, the `stats` field) through plain HTTP.

Every browser test runs in a fresh browser context (empty storage) and, at its end, checks that the page
made no request outside the server, logged no console error and raised no JavaScript error or alert.
"""
from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import serving  # the tests' shared server helpers

from edgellm.server import web

MODEL = "smollm2-135m"
CHROMIUM = os.environ.get("EDGELLM_CHROMIUM", "/usr/bin/chromium")
# chromium in a container with no network: no sandbox (no user namespaces), no GPU, no background traffic
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
STATIC = Path(web.__file__).parent / "static"
LONG = "Write a long story about a dragon who learns to bake bread."
HOSTILE_MD = ("Look: [click me](javascript:alert(1)) and [data](data:text/html,<script>alert(2)</script>) "
              "and <script>alert(3)</script> <img src=x onerror=alert(4)> ![pic](http://example.com/x.png) "
              "[ok](https://example.org/page) `<b>code</b>`\n\n"
              "```html\n<iframe src=\"javascript:alert(5)\"></iframe>\n```\n\n"
              "| a | b |\n|---|---|\n| <svg onload=alert(6)> | **bold** |\n")


# -- a real server ----------------------------------------------------------------------------------
def running(path, *, n_ctx: int = 1024, **config):
    """An in-process server on an ephemeral loopback port (two slots unless told otherwise)."""
    return serving.running(path, n_ctx=n_ctx, **{"parallel": 2, **config})


@pytest.fixture(scope="module")
def base(default_model_path):
    with running(default_model_path, default_max_tokens=16) as url:
        yield url


def get(url: str, headers: dict | None = None) -> tuple[int, Any, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(base: str) -> dict:
    return json.loads(get(f"{base}/health")[2])


def wait_until(cond, timeout: float = 60, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"{what} not reached in {timeout} s"
        time.sleep(0.05)


def stream_events(base: str, body: dict, headers: dict | None = None):
    """POST a streaming chat request; yields each SSE event's JSON (the connection stays open meanwhile)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    try:
        for line in r:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                yield json.loads(line[6:])
    finally:
        conn.close()


# -- the page's files and the server additions, over plain HTTP ----------------------------------------
def test_page_is_served_from_the_package_with_a_strict_csp(base):
    status, headers, html = get(f"{base}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["Content-Security-Policy"] == web.CSP
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "img-src 'self'",
                      "require-trusted-types-for 'script'", "frame-ancestors 'none'"):
        assert directive in web.CSP
    assert "unsafe-inline" not in web.CSP and "unsafe-eval" not in web.CSP and "http" not in web.CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    # every shipped file is listed (and nothing else is served), with its type; the page fits 300 KB
    assert sorted(p.name for p in STATIC.iterdir()) == sorted(web.ASSETS)
    total = len(html)
    for name, media in web.ASSETS.items():
        if name == "index.html":
            continue
        status, h, body = get(f"{base}/static/{name}")
        assert status == 200 and h["Content-Type"] == media and body == (STATIC / name).read_bytes()
        assert h["Content-Security-Policy"] == web.CSP
        total += len(body)
        status, _, _ = get(f"{base}/static/{name}", {"If-None-Match": h["ETag"]})
        assert status == 304
    assert total == web.page_weight() <= 300_000
    for bad in ("/static/nope.js", "/static/index.html", "/static/..%2fapp.py", "/static/%2e%2e/web.py",
                "/static/../web.py", "/static/", "/static/app.js/x"):
        assert get(f"{base}{bad}")[0] == 404, bad
    # nothing inline for the CSP to forbid, and no URL outside the server
    assert not re.search(rb"<script(?![^>]*\bsrc=)", html) and b"<style" not in html
    assert not re.search(rb"\s(on\w+|style)=", html)
    for name in web.ASSETS:
        text = (STATIC / name).read_text()
        assert set(re.findall(r"https?://\w[\w.-]*", text)) <= {"http://www.w3.org"}, name  # (the SVG namespace)
        if name.endswith(".js"):  # no HTML-string sinks and no string evaluation anywhere in the page
            assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function|"
                                 r"setTimeout\(['\"]", text), name


def test_info_reports_model_plan_and_kv_state(base, llm):
    status, _, raw = get(f"{base}/v1/edgellm/info")
    info = json.loads(raw)
    assert status == 200 and info["model"] == MODEL and info["object"] == "edgellm.info"
    assert info["backend"] == llm.plan.backend == info["plan"]["backend"] and info["device"] == llm.plan.device
    assert info["plan"]["reasons"] and all(isinstance(r, str) and r for r in info["plan"]["reasons"])
    assert info["context_tokens"] == 1024 and len(info["slots"]) == 2 and info["mode"] == "batch"
    assert info["defaults"]["max_tokens"] == 16 and info["defaults"]["sampler"]["temperature"] == 0
    assert set(info["kv_cache"]) == {"memory_states", "memory_bytes", "memory_max_bytes", "pinned"}
    assert info["api_key_required"] is False and health(base)["api_key_required"] is False
    status, body = post(f"{base}/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6})
    assert status == 200
    cached = [s["cached_tokens"] for s in json.loads(get(f"{base}/v1/edgellm/info")[2])["slots"]]
    # the slot keeps the prompt and the answer's tokens, but for the last one of an answer cut at max_tokens
    # (sampled, never evaluated)
    cut = body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] - cut in cached


def test_responses_carry_stats(base):
    msg = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 8}
    status, body = post(f"{base}/v1/chat/completions", msg)
    s, u = body["stats"], body["usage"]
    assert status == 200 and s["finish_reason"] in ("stop", "length")
    assert s["prompt_tokens"] == u["prompt_tokens"] and s["completion_tokens"] == u["completion_tokens"]
    assert s["ttft_ms"] > 0 and s["total_ms"] >= s["ttft_ms"]
    assert s["completion_tokens"] < 2 or s["decode_tps"] > 0
    status, again = post(f"{base}/v1/chat/completions", msg)  # the same prompt: its KV is reused
    assert again["stats"]["reused_tokens"] == again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again["stats"]["cache_source"] == "slot"
    assert again["stats"]["prefill_tokens"] == again["stats"]["prompt_tokens"] - again["stats"]["reused_tokens"]
    events = list(stream_events(base, msg))
    final = [e for e in events if e.get("choices") and e["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["stats"]["completion_tokens"] == again["stats"]["completion_tokens"]
    status, text = post(f"{base}/v1/completions", {"prompt": "The sky is", "max_tokens": 4})
    assert status == 200 and text["stats"]["completion_tokens"] == text["usage"]["completion_tokens"]


def test_cancel_by_id_ends_the_stream_and_frees_the_slot(base):
    events = stream_events(base, {"messages": [{"role": "user", "content": LONG}], "max_tokens": 400,
                                  "temperature": 0})
    first = next(events)
    rid = first["id"]
    pieces = list(itertools.islice(events, 3))  # a few tokens in
    assert health(base)["busy"] == 1 and all(e["id"] == rid for e in pieces)
    status, body = post(f"{base}/v1/edgellm/cancel/{rid}")
    assert status == 200 and body == {"id": rid, "object": "edgellm.cancel", "cancelled": True}
    rest = list(events)  # the stream ends by itself: a final chunk, not an error
    final = rest[-1]
    assert "error" not in final and final["choices"][0]["finish_reason"] == "stop"
    assert final["stats"]["finish_reason"] == "cancelled" and 0 < final["stats"]["completion_tokens"] < 400
    wait_until(lambda: health(base)["busy"] == 0, 10, "slot freed")
    assert post(f"{base}/v1/edgellm/cancel/{rid}")[0] == 404  # finished answers are forgotten
    status, body = post(f"{base}/v1/edgellm/cancel/chatcmpl-{'0' * 24}")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert post(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})[0] == 200


# -- the browser -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if shutil.which("apt-get"):
            pytest.fail(f"{CHROMIUM} is missing: run .ci/setup.sh (it installs Debian's chromium)")
        pytest.skip(f"no chromium at {CHROMIUM} (set EDGELLM_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Watch:
    """What a page did: requests, console errors, JS errors, JS dialogs (alert/confirm)."""

    def __init__(self, page) -> None:
        self.requests: list = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("request", lambda r: self.requests.append(r))
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def posted(self, path: str) -> list[dict]:
        return [json.loads(r.post_data) for r in self.requests if r.url.endswith(path) and r.method == "POST"]


@contextmanager
def open_page(browser, url: str, *, viewport=(1280, 800), allow_errors: str | None = None, wait_ready=True):
    ctx = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True)
    page = ctx.new_page()
    watch = Watch(page)
    try:
        page.goto(url + "/")
        if wait_ready:
            page.wait_for_selector("body[data-ready]", state="attached", timeout=60_000)
        yield page, watch
        origin = url + "/"
        outside = [r.url for r in watch.requests if not (r.url.startswith(origin) or r.url.startswith("blob:"))]
        assert not outside, f"requests outside the server: {outside}"
        errors = [e for e in watch.errors if not (allow_errors and re.search(allow_errors, e))]
        assert not errors, f"console errors: {errors}"
        assert not watch.dialogs, f"JavaScript dialogs: {watch.dialogs}"
    finally:
        ctx.close()


def answers(page) -> list[dict]:
    """The current conversation's messages as the page stores them."""
    store = page.evaluate("JSON.parse(localStorage.getItem('edgellm.chats.v1'))")
    chat = next(c for c in store["chats"] if c["id"] == store["current"])
    return chat["messages"]


def wait_answer(page, timeout: float = 240) -> None:
    page.wait_for_function("() => { const a = [...document.querySelectorAll('article.assistant')].pop();"
                           " return a && a.dataset.state !== 'streaming'; }", timeout=timeout * 1000)


def send(page, text: str, *, wait: bool = True) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")
    if wait:
        wait_answer(page)


def set_setting(page, name: str, value) -> None:
    if page.is_hidden("#settings"):
        page.click("#settings-toggle")
    page.fill(f"#set-{name}", str(value))
    page.click("#settings-toggle")  # closes the panel


@pytest.mark.slow
def test_answer_streams_token_by_token_and_equals_the_api(browser, base):
    with open_page(browser, base) as (page, watch):
        page.fill("#input", "line one")
        page.press("#input", "Shift+Enter")
        page.type("#input", "line two")
        assert page.input_value("#input") == "line one\nline two" and not watch.posted("/v1/chat/completions")
        page.fill("#input", "")
        set_setting(page, "max_tokens", 24)
        page.evaluate("""() => {
            window.__seen = [];
            new MutationObserver(() => {
                const a = [...document.querySelectorAll('article.assistant .body')].pop();
                const n = a ? a.textContent.length : 0;
                if (n && n !== window.__seen[window.__seen.length - 1]) window.__seen.push(n);
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }""")
        send(page, "Name three fruits.")
        seen = page.evaluate("window.__seen")
        stored = answers(page)
        assert [m["role"] for m in stored] == ["user", "assistant"] and stored[1]["content"]
        stats = stored[1]["stats"]
        assert len(seen) >= 4 and seen == sorted(seen), seen  # grew piece by piece, never re-ordered
        assert stats["completion_tokens"] >= len(seen) - 1 and stats["page_ttft_ms"] > 0 and stats["ttft_ms"] > 0
        meta = page.inner_text("article.assistant .meta")
        assert "TTFT" in meta and "tok/s" in meta and "reused from the KV cache" in meta
        # the page sent exactly the conversation (no hidden extras), and the server's greedy answer to the same
        # request over the plain API is the same text
        (body,) = watch.posted("/v1/chat/completions")
        assert body["messages"] == [{"role": "user", "content": "Name three fruits."}] and body["max_tokens"] == 24
        assert body["stream"] is True
        status, api = post(f"{base}/v1/chat/completions", {k: v for k, v in body.items() if k != "stream"})
        assert status == 200 and api["choices"][0]["message"]["content"] == stored[1]["content"]
        assert page.inner_text("#model").startswith(MODEL)


@pytest.mark.slow
def test_stop_cancels_on_the_server_and_frees_the_slot(browser, base):
    with open_page(browser, base) as (page, watch):
        set_setting(page, "max_tokens", 300)
        send(page, LONG, wait=False)
        page.wait_for_function("() => (document.querySelector('article.assistant .body')?.textContent || '')"
                               ".length > 8", timeout=240_000)
        assert health(base)["busy"] == 1
        page.keyboard.press("Escape")
        wait_answer(page, 30)
        wait_until(lambda: health(base)["busy"] == 0, 10, "slot freed")
        assert page.get_attribute("article.assistant", "data-state") == "cancelled"
        assert any("/v1/edgellm/cancel/chatcmpl-" in r.url for r in watch.requests)  # asked, not just hung up
        stats = answers(page)[1]["stats"]
        assert stats["finish_reason"] == "cancelled" and 0 < stats["completion_tokens"] < 300
        assert "stopped" in page.inner_text("article.assistant .meta") and page.is_visible("#send")
        # a reload mid-answer (the connection drops) also frees the slot
        send(page, LONG, wait=False)
        page.wait_for_function("() => ([...document.querySelectorAll('article.assistant .body')].pop()"
                               "?.textContent || '').length > 8", timeout=240_000)
        assert health(base)["busy"] == 1
        page.reload()
        wait_until(lambda: health(base)["busy"] == 0, 15, "slot freed after the page went away")
        page.wait_for_selector("body[data-ready]", state="attached")


@pytest.mark.slow
def test_conversations_keep_separate_histories_and_survive_reload(browser, base):
    with open_page(browser, base) as (page, watch):
        send(page, "My name is Ann.")
        page.click("#new-chat")
        send(page, "What is 2 + 2?")
        assert page.locator("#chat-list li").count() == 2
        page.click("#chat-list li:nth-child(2) .title")  # back to the first (most recent is on top)
        send(page, "What is my name?")
        bodies = watch.posted("/v1/chat/completions")
        first, second, third = ([m["content"] for m in b["messages"]] for b in bodies)
        assert first == ["My name is Ann."] and second == ["What is 2 + 2?"]
        assert third[0] == "My name is Ann." and third[-1] == "What is my name?" and len(third) == 3
        assert not any("2 + 2" in t for t in third)
        before = {title: texts for title, texts in conversations(page).items()}
        assert set(before) == {"My name is Ann.", "What is 2 + 2?"}

        page.reload()
        page.wait_for_selector("body[data-ready]", state="attached")
        assert conversations(page) == before
        # rename, export, delete
        page.click("#chat-list li:has-text('What is 2 + 2?') button[title=Rename]")
        page.fill("#chat-list input.rename", "Arithmetic")
        page.press("#chat-list input.rename", "Enter")
        with page.expect_download() as dl:
            page.click("#chat-list li:has-text('Arithmetic') button[title='Export as JSON']")
        exported = json.loads(Path(dl.value.path()).read_text())
        assert exported["format"] == "edgellm-chats" and exported["chats"][0]["title"] == "Arithmetic"
        assert exported["chats"][0]["messages"][0]["content"] == "What is 2 + 2?"
        page.click("#chat-list li:has-text('Arithmetic') button[title=Delete]")
        page.click("#chat-list li:has-text('Arithmetic') button[title=Delete]")  # second click confirms
        page.reload()
        page.wait_for_selector("body[data-ready]", state="attached")
        assert list(conversations(page)) == ["My name is Ann."]
        page.set_input_files("#import-file", files=[{"name": "a.json", "mimeType": "application/json",
                                                     "buffer": json.dumps(exported).encode()}])
        page.wait_for_selector("#chat-list li:has-text('Arithmetic')")
        assert conversations(page)["Arithmetic"] == before["What is 2 + 2?"]


def conversations(page) -> dict[str, list[str]]:
    """{title: [message texts as shown]} for every conversation in the sidebar (clicking through them)."""
    out = {}
    for i in range(page.locator("#chat-list li").count()):
        item = page.locator("#chat-list li").nth(i)
        title = item.locator(".title").inner_text()
        item.locator(".title").click()
        out[title] = page.locator("#messages article .body").all_inner_texts()
    return out


@pytest.mark.slow
def test_hostile_text_renders_as_text(browser, base):
    with open_page(browser, base) as (page, watch):
        set_setting(page, "max_tokens", 4)
        send(page, "<img src=x onerror=alert(1)> [click](javascript:alert(1))")
        assert page.inner_text("article.user .body") == "<img src=x onerror=alert(1)> [click](javascript:alert(1))"
        # an assistant message with hostile markdown (as an import file or a model could bring it)
        chat = {"format": "edgellm-chats", "version": 1, "chats": [{"title": "hostile", "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": HOSTILE_MD}]}]}
        page.set_input_files("#import-file", files=[{"name": "h.json", "mimeType": "application/json",
                                                     "buffer": json.dumps(chat).encode()}])
        page.wait_for_selector("article.assistant .body table")
        body = page.locator("article.assistant .body")
        shown = body.inner_text()
        for literal in ("[click me](javascript:alert(1))", "<script>alert(3)</script>", "<img src=x onerror=alert(4)>",
                        "<iframe src=\"javascript:alert(5)\"></iframe>", "<svg onload=alert(6)>", "<b>code</b>"):
            assert literal in shown, literal
        assert page.locator("#messages img, #messages script, #messages iframe, #messages svg").count() == 0
        hrefs = page.eval_on_selector_all("#messages a", "as => as.map(a => a.getAttribute('href'))")
        assert hrefs == ["http://example.com/x.png", "https://example.org/page"]  # the image shows as a link
        attrs = page.evaluate("""() => [...document.querySelectorAll('#messages *')].flatMap(
            e => [...e.attributes].map(a => a.name)).filter(n => n.startsWith('on') || n === 'style')""")
        assert attrs == []
        # the renderer on its own, over a battery of tricks
        for src in ["[x](JaVaScRiPt:alert(1))", "[x]( javascript:alert(1))", "[x](java\tscript:alert(1))",
                    "[x](\x01javascript:alert(1))", "[x](vbscript:msgbox(1))", "[x](//evil.example/)",
                    "<a href=javascript:alert(1)>x</a>", "**<img src=x onerror=alert(1)>**", "javascript:alert(1)",
                    "[x](https://ok.example/\" onmouseover=\"alert(1))"]:
            out = page.evaluate("""async (src) => {
                const md = await import('/static/markdown.js');
                const div = md.renderMarkdown(src, document.createElement('div'));
                return {links: [...div.querySelectorAll('a')].map(a => a.href),
                        tags: [...div.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
                        text: div.textContent};
            }""", src)
            assert all(u.startswith("https://ok.example/") for u in out["links"]), (src, out)
            assert not set(out["tags"]) - {"p", "strong", "em", "code", "a", "br"}, (src, out)
        # the CSP in force: no HTML-string sinks (Trusted Types), no request to another origin
        blocked = page.evaluate("""async () => {
            const r = {violated: []};
            document.addEventListener('securitypolicyviolation', e => r.violated.push(e.violatedDirective));
            try { document.body.insertAdjacentHTML('beforeend', '<b>x</b>'); r.html = 'allowed'; }
            catch (e) { r.html = e.name; }
            try { await fetch('http://192.0.2.1/x'); r.fetch = 'allowed'; } catch (e) { r.fetch = e.name; }
            for (let i = 0; i < 100 && r.violated.length < 2; i++) await new Promise(ok => setTimeout(ok, 20));
            r.violated.sort();
            return r;
        }""")
        assert blocked == {"html": "TypeError", "fetch": "TypeError",
                           "violated": ["connect-src", "require-trusted-types-for"]}
        watch.errors[:] = [e for e in watch.errors if "Content Security Policy" not in e and
                           "TrustedHTML" not in e]  # the two violations provoked just above
        assert not watch.dialogs


@pytest.mark.slow
def test_api_key_is_asked_once(browser, default_model_path):
    # a refused key logs the 401 of that one request (that is the browser reporting it, by design)
    with running(default_model_path, default_max_tokens=6, api_key="sekret") as url, \
            open_page(browser, url, wait_ready=False, allow_errors=r"status of 401") as (page, watch):
        page.wait_for_selector("#key-dialog[open]")
        assert not [r for r in watch.requests if "/v1/" in r.url]  # asked before any refused request
        page.fill("#key-input", "wrong")
        page.press("#key-input", "Enter")
        page.wait_for_function("() => document.getElementById('key-msg').textContent.includes('refused')")
        assert page.is_visible("#key-dialog[open]")
        page.fill("#key-input", "sekret")
        page.click("#key-ok")
        page.wait_for_selector("body[data-ready]", state="attached")
        assert page.is_hidden("#key-dialog") and page.inner_text("#model").startswith(MODEL)
        send(page, "Hello!")
        assert answers(page)[1]["content"] and "stats" in answers(page)[1]
        page.reload()
        page.wait_for_selector("body[data-ready]", state="attached")
        assert page.is_hidden("#key-dialog")  # kept: asked once
        auth = [r.all_headers().get("authorization") for r in watch.requests if "/v1/chat/completions" in r.url]
        assert auth == ["Bearer sekret"]
        page.click("#info-toggle")
        page.click("#forget-key")
        assert page.evaluate("localStorage.getItem('edgellm.apiKey')") is None


@pytest.mark.slow
def test_usable_at_phone_width(browser, base):
    with open_page(browser, base, viewport=(390, 844)) as (page, _):
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390
        assert page.is_visible("#menu") and page.is_visible("#input") and page.is_visible("#send")
        box = page.locator("#sidebar").bounding_box()
        assert box["x"] + box["width"] <= 0  # off screen until asked for
        page.click("#menu")
        page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().x >= 0")
        page.click("#new-chat")
        page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().right <= 0")
        page.click("#info-toggle")
        info_box = page.locator("#info").bounding_box()
        assert info_box["width"] <= 390 and page.inner_text("#info-body").count("tokens cached") == 2
        page.click("#info .close")  # no Esc key on a phone
        assert page.is_hidden("#info") and page.is_visible("#input")


# -- edgellm chat --web ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_chat_web_serves_the_page_and_opens_the_browser(default_model_path, tmp_path):
    opened = tmp_path / "opened.txt"
    fake = tmp_path / "browser.sh"  # $BROWSER for Python's webbrowser: records the URL it was asked to open
    fake.write_text(f"#!/bin/sh\necho \"$1\" > {opened}\n")
    fake.chmod(0o755)
    port = free_port()
    env = {**os.environ, "BROWSER": str(fake)}
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "chat", str(default_model_path), "--web", "--port",
                             str(port), "--ctx", "512", "-n", "6", "-t", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: opened.exists() or proc.poll() is not None, 120, "browser opened")
        assert proc.poll() is None, proc.stderr.read()
        url = opened.read_text().strip()
        assert url == f"http://127.0.0.1:{port}/"
        status, _, html = get(url)
        assert status == 200 and b"static/app.js" in html
        status, body = post(f"{url}v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
        assert status == 200 and body["usage"]["completion_tokens"] <= 6 and body["model"] == MODEL
        info = json.loads(get(f"{url}v1/edgellm/info")[2])
        assert info["defaults"]["sampler"]["temperature"] == 0 and len(info["slots"]) == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert f"chat page: {url}  (opened in your browser)" in err and "Ctrl-C to stop" in err
        assert "Traceback" not in err and "Error" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_chat_web_refuses_terminal_only_options(default_model_path):
    r = subprocess.run([sys.executable, "-m", "edgellm.cli", "chat", str(default_model_path), "--web", "--stop", "x"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "--stop" in r.stderr and "Traceback" not in r.stderr
