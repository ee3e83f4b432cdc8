"""systemd units and the settings file for an installed bundle: the server, and an RPC worker."""
from __future__ import annotations

import shlex
from collections.abc import Mapping

PREFIX = "/opt/edgellm"  # install.sh's default EDGELLM_PREFIX; units refer to the `current` release
STATE_DIR = "/var/lib/edgellm"  # the service's EDGELLM_HOME: its on-disk KV cache lives here
USER = "edgellm"
EXE = f"{PREFIX}/current/venv/bin/edgellm"
RPC_PORT = 50052  # edgellm.runtimes.rpc.DEFAULT_PORT (not imported: units stay free of ctypes code)


def server_unit(model_file: str, *, host: str, port: int, n_ctx: int, kv_type: str, threads: int,
                parallel: int, prompt_state: str | None = None, system: str | None = None) -> str:
    """The unit that runs `edgellm serve` on the board (hardened: read-only system, own user)."""
    args = [EXE, "serve", f"{PREFIX}/models/{model_file}", "--host", host, "--port", str(port),
            "--ctx", str(n_ctx), "--kv-type", kv_type, "--parallel", str(parallel)]
    if system is not None:  # for chat requests without a system message
        args += ["--system", system]
    if prompt_state:
        args += ["--system-state", f"{PREFIX}/current/state/{prompt_state}"]
    return "\n".join([
        "[Unit]",
        f"Description=edgellm OpenAI-compatible server ({model_file}) on {host}:{port}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={USER}",
        f"Environment=EDGELLM_HOME={STATE_DIR}",
        f"Environment=EDGELLM_THREADS={threads}",
        f"ExecStart={exec_line(args)}",
        "Restart=on-failure",
        "RestartSec=2",
        "TimeoutStopSec=30",
        f"StateDirectory={STATE_DIR.removeprefix('/var/lib/')}",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def exec_line(args: list[str]) -> str:
    """systemd's ExecStart quoting: double quotes, with $ and % escaped so systemd leaves them alone."""
    def q(a: str) -> str:
        if a and all(c.isalnum() or c in "/._-:=+,@" for c in a):
            return a
        return '"' + a.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$").replace("%", "%%") + '"'

    return " ".join(q(a) for a in args)


def parse_unit(text: str) -> dict[str, list[str]]:
    """key -> values of a unit file's [Service]/[Unit]/[Install] lines (repeated keys accumulate)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def exec_argv(value: str) -> list[str]:
    """Split an ExecStart value the way systemd does for the quoting exec_line produces."""
    return [a.replace("$$", "$").replace("%%", "%") for a in shlex.split(value)]


def env_file(values: Mapping[str, str | int]) -> str:
    """bundle.env: the settings install.sh, uninstall.sh and healthcheck.sh source."""
    return "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in values.items())


def worker_unit(*, host: str = "0.0.0.0", port: int = RPC_PORT, threads: int | None = None,
                exec_start: str = "/opt/edgellm/venv/bin/edgellm", user: str = "edgellm",
                cache_dir: str | None = "/var/cache/edgellm/rpc") -> str:
    """The text of a systemd unit that runs an RPC worker on a board (for `edgellm deploy`)."""
    args = [exec_start, "rpc-worker", "--host", host, "--port", str(port)]
    if threads:
        args += ["--threads", str(threads)]
    if cache_dir:
        args += ["--cache-dir", cache_dir]
    lines = [
        "[Unit]",
        "Description=edgellm RPC worker (llama.cpp ggml-rpc) on port %d" % port,
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        f"User={user}",
        f"ExecStart={shlex.join(args)}",
        "Restart=on-failure",
        "RestartSec=2",
        *([f"CacheDirectory={cache_dir.removeprefix('/var/cache/')}"]
          if cache_dir and cache_dir.startswith("/var/cache/") else []),
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)
