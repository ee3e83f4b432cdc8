"""The chat page `edgellm serve` ships at `/`, its security headers, and opening it in a browser.

The page is buildless: plain ES modules and one stylesheet in edgellm/server/static/, shipped as package
data, so it works offline and from a wheel. The files are a fixed list served from memory, each with an
explicit Content-Type (a module script needs a JavaScript type, and mimetypes' answer varies by system)
and a strong ETag: no path from the URL ever reaches the filesystem, so there is no traversal to defend.

Content-Security-Policy: everything from this origin only (scripts, styles, images, fetch), nothing inline,
no plugins, no framing, no form posts, no <base>; and Trusted Types with no policy, so assigning a string
to innerHTML (or any other HTML sink) throws: message text can only reach the page as text nodes.
"""
from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import Route

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
       "require-trusted-types-for 'script'; trusted-types 'none'")

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), usb=(), payment=()",
    "Cache-Control": "no-cache",  # revalidate with the ETag: an upgraded package shows its new page at once
}

# name -> Content-Type; every file the page is made of (tests/test_web.py checks the directory matches)
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "chats.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "view.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """The page's files, read once from the installed package."""
    root = resources.files("edgellm.server") / "static"
    out = {}
    for name, media in ASSETS.items():
        body = (root / name).read_bytes()
        out[name] = Asset(body, media, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return out


def page_weight() -> int:
    """Bytes the page downloads (all its files, uncompressed): the issue's target is ≤ 300 KB."""
    return sum(len(a.body) for a in load_assets().values())


def page_routes() -> list[Route]:
    """`/` (the page) and `/static/NAME` (its modules, stylesheet and icon). Open without the API key:
    the page holds no data; it asks for the key before it calls /v1/*."""
    assets = load_assets()

    def send(asset: Asset, request: HTTPRequest) -> Response:
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers={**HEADERS, "ETag": asset.etag})
        return Response(asset.body, media_type=asset.media_type, headers={**HEADERS, "ETag": asset.etag})

    async def index(request: HTTPRequest) -> Response:
        return send(assets["index.html"], request)

    async def static(request: HTTPRequest) -> Response:
        asset = assets.get(request.path_params["name"])
        if asset is None or request.path_params["name"] == "index.html":
            return Response("not found", status_code=404, media_type="text/plain", headers=HEADERS)
        return send(asset, request)

    return [Route("/", index, methods=["GET", "HEAD"]),
            Route("/static/{name}", static, methods=["GET", "HEAD"])]


def open_when_ready(started: Callable[[], bool], url: Callable[[], str], *, browser: bool = True,
                    say: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                    timeout_s: float = 120.0) -> threading.Thread:
    """Once `started()` is true, open `url()` (known only then when the port was 0) in the user's browser
    (Python's webbrowser: $BROWSER, else the desktop's default) and say where the page is; when no browser
    opens, say to open the URL by hand."""
    def run() -> None:
        end = time.monotonic() + timeout_s
        while not started():
            if time.monotonic() > end:
                return
            time.sleep(0.05)
        where = url()
        opened = False
        if browser:
            import webbrowser

            try:
                opened = webbrowser.open(where, new=2)
            except Exception:  # noqa: BLE001 - any failure to launch a browser means: print the URL
                opened = False
        say(f"chat page: {where}" + ("  (opened in your browser)" if opened else "  (open it in your browser)"))

    thread = threading.Thread(target=run, name="edgellm-open-browser", daemon=True)
    thread.start()
    return thread

