"""What every benchmark JSON carries besides its figures: how to reproduce it and where it ran.

Each script in benchmarks/ writes its result to benchmarks/out/<name>.json (committed, small) through
`save()`, which adds a `meta` block — the command line that reproduces the run, the machine, the load
average at the start and the end (this machine is shared: same-run ratios are what count), the library
versions and the date — and writes the file atomically. benchmarks/report.py turns those files into
benchmarks/README.md, so no figure is ever copied by hand.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
_START: dict[str, Any] = {}


def out_path(name: str) -> Path:
    """The default --out of a benchmark: benchmarks/out/<name>.json."""
    return OUT / f"{name}.json"


def start() -> None:
    """Note the load average and the clock at the start of a run (save() adds the end)."""
    _START.update(load=os.getloadavg(), t=time.time())


def machine() -> dict[str, Any]:
    """The machine in a few fields: CPU model, logical cores, RAM, OS, SIMD level."""
    try:
        from edgellm.device import probe

        p = probe()
        simd = [f for f in ("avx512f", "avx2", "neon", "amx_int8") if f in p.features]
        return {"cpu": p.cpu_model, "logical_cores": p.logical_cores, "ram_gib": round(p.ram_bytes / 2**30, 1),
                "os": f"{platform.system()} {platform.machine()}", "simd": simd}
    except Exception as e:  # noqa: BLE001 - a benchmark must still save its figures
        return {"cpu": platform.processor() or "?", "logical_cores": os.cpu_count(), "os": platform.platform(),
                "probe_error": str(e)}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("edgellm", "llama-cpp-python", "onnxruntime", "onnxruntime-genai", "numpy", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def meta(script: str, argv: list[str] | None = None) -> dict[str, Any]:
    """The meta block: reproducing command, machine, load, versions, date."""
    args = sys.argv[1:] if argv is None else argv
    now = time.time()
    block = {"command": shlex.join(["python", f"benchmarks/{script}", *args]), "machine": machine(),
             "load_average_start": [round(x, 2) for x in _START.get("load", os.getloadavg())],
             "load_average_end": [round(x, 2) for x in os.getloadavg()], "versions": versions(),
             "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(now))}
    if "t" in _START:
        block["seconds"] = round(now - _START["t"], 1)
    return block


def save(result: dict[str, Any], out: Path | None, script: str, argv: list[str] | None = None) -> str:
    """Add the meta block to `result`, write it to `out` (atomically) and return the JSON text."""
    result = {**result, "meta": meta(script, argv)}
    text = json.dumps(result, indent=2, default=str, ensure_ascii=False)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, out)
    return text


def wait_healthy(proc, url: str, what: str = "server", timeout: float = 120.0) -> None:
    """Return once GET {url}/health answers; raise with the end of the process's stderr if it exits or the
    timeout passes first (every server benchmark starts its servers this way)."""
    import time
    import urllib.request

    end = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                err = proc.stderr.read() if proc.stderr else b""
                err = err.decode(errors="replace") if isinstance(err, bytes) else str(err)
                raise RuntimeError(f"{what} did not start: {err[-2000:]}") from None
            time.sleep(0.1)

