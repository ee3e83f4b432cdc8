#!/bin/bash
# Is the installed service answering? Exit 0 when /health says ok (and, for a server, /v1/models
# lists the model); prints what it found. Usage: ./healthcheck.sh [timeout-seconds]
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
PY="$PREFIX/current/venv/bin/python"
[ -f "$PY" ] || { echo "edgellm health: not installed under $PREFIX (run install.sh)" >&2; exit 2; }
if [ "$SERVICE_KIND" = rpc-worker ]; then
  exec "$PY" - "$PORT" "${1:-5}" <<'PY'
import socket, sys
port, timeout = int(sys.argv[1]), float(sys.argv[2])
try:
    socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
except OSError as e:
    sys.exit(f"edgellm health: RPC worker on port {port} is not accepting connections ({e})")
print(f"edgellm health: RPC worker listening on port {port}")
PY
fi
exec "$PY" - "$PORT" "${1:-5}" "${EDGELLM_API_KEY:-}" <<'PY'
import json, sys, urllib.request
port, timeout, key = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
headers = {"Authorization": f"Bearer {key}"} if key else {}
base = f"http://127.0.0.1:{port}"
try:
    with urllib.request.urlopen(urllib.request.Request(base + "/health", headers=headers), timeout=timeout) as r:
        health = json.load(r)
    with urllib.request.urlopen(urllib.request.Request(base + "/v1/models", headers=headers), timeout=timeout) as r:
        models = [m["id"] for m in json.load(r)["data"]]
except (OSError, ValueError, KeyError) as e:
    sys.exit(f"edgellm health: server on port {port} is not healthy ({e})")
print(f"edgellm health: ok {json.dumps(health)} models={models}")
PY
