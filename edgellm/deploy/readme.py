"""The README that travels inside a bundle: what it is and the three commands a user runs on the board."""
from __future__ import annotations

from . import units


def bundle_readme(spec, board, service: str, manifest: dict) -> str:
    model = manifest.get("model")
    what = (f"an OpenAI-compatible server for `{model['file']}` on {spec.host}:{spec.port}" if model
            else f"an RPC worker (llama.cpp ggml-rpc) on {spec.host}:{spec.port}")
    fit = manifest.get("fit") or {}
    lines = [
        f"# edgellm bundle for {board.name} ({board.cpu})",
        "",
        f"Runs {what} as the systemd service `{service}`.",
        "Installs offline: no internet and no compiler needed on the board.",
        "",
        "Requirements: Raspberry Pi OS (64-bit) bookworm, Python 3.11 (the OS's python3), root.",
        "",
        "```",
        "tar xzf BUNDLE.tar.gz && cd BUNDLE     # if you copied the .tar.gz",
        "sudo ./install.sh                     # safe to run again",
        "./healthcheck.sh                      # exit 0 when the service answers",
        "sudo ./uninstall.sh [--purge]         # --purge also removes its state and user",
        "```",
        "",
        f"Installs into {units.PREFIX} (EDGELLM_PREFIX), the unit into /etc/systemd/system, state into",
        f"{units.STATE_DIR}; the service runs as the system user `{units.USER}`.",
    ]
    if model:
        lines += [
            "",
            "Try it:",
            "```",
            f"curl -s http://127.0.0.1:{spec.port}/v1/chat/completions -H 'Content-Type: application/json' \\",
            f"  -d '{{\"model\": \"{model['file'].removesuffix('.gguf')}\", "
            "\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"max_tokens\": 64}'",
            "```",
        ]
    if spec.system_prompt:
        lines += ["", "Chat requests without a system message get this one (--system); its KV state ships in",
                  "state/ (--system-state), so the service restores it instead of evaluating it for every",
                  "conversation that starts with it (`usage.prompt_tokens_details.cached_tokens`):", "",
                  f"> {spec.system_prompt}"]
    if spec.host in ("127.0.0.1", "localhost", "::1"):
        lines += ["", "The service listens on loopback only; rebuild the bundle with --host 0.0.0.0 to reach it "
                  "from the network."]
    if fit:
        lines += ["", f"Memory: {fit.get('message', '')}."]
    rt = manifest["runtime"]
    lines += ["", f"Runtime: llama-cpp-python {rt['llama_cpp_python']} built for {rt['cpu']} "
              f"({' '.join(rt['cmake'])}).", ""]
    return "\n".join(lines)
