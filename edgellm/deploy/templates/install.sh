#!/bin/bash
# Install this edgellm bundle on a Raspberry Pi OS (64-bit, Debian 12) board: offline, no compiler.
# Safe to run again: an installed bundle is left as it is, a new one replaces it (the previous
# release is removed only after the new one is complete).
#   sudo ./install.sh            install and start the service
#   EDGELLM_PREFIX=/opt/x ./install.sh   install elsewhere (EDGELLM_UNIT_DIR for the unit file)
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
RELEASE="$PREFIX/releases/$BUNDLE_ID"
need_root
arch=$(uname -m)
[ "$arch" = aarch64 ] || die "this bundle is for 64-bit Arm (aarch64), this machine is $arch"
command -v python3 >/dev/null || die "python3 is missing (Raspberry Pi OS ships it: apt install python3)"
pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$pyver" = "$PYTHON_VERSION" ] || die "this bundle's wheels are for Python $PYTHON_VERSION, python3 is $pyver"

say "checking the bundle's files"
(cd "$HERE" && sha256sum --quiet -c SHA256SUMS) || die "bundle files are damaged (SHA256SUMS mismatch): copy it again"

if [ -f "$RELEASE/.complete" ]; then
  say "release $BUNDLE_ID is already installed"
else
  say "creating the Python environment in $RELEASE (offline, from the bundle's wheels)"
  rm -rf "$RELEASE"
  mkdir -p "$RELEASE"
  python3 -m venv --without-pip "$RELEASE/venv"
  pip_whl=("$HERE"/wheels/pip-*.whl)
  [ -f "${pip_whl[0]}" ] || die "the bundle has no pip wheel"
  "$RELEASE/venv/bin/python" "${pip_whl[0]}/pip" install --quiet --no-index --no-cache-dir \
    --disable-pip-version-check --find-links "$HERE/wheels" pip "$REQUIREMENT"
  # the runtime must load here, with this board's libraries, before anything points at it
  "$RELEASE/venv/bin/python" -c 'import llama_cpp, edgellm; llama_cpp.llama_backend_init()' \
    || die "the runtime does not load on this board"
  if [ -n "${STATE_FILE:-}" ]; then
    mkdir -p "$RELEASE/state"
    cp "$HERE/$STATE_FILE" "$RELEASE/state/"
  fi
  touch "$RELEASE/.complete"
fi

if [ -n "${MODEL_FILE:-}" ]; then
  model_dest="$PREFIX/models/$(basename "$MODEL_FILE")"
  if [ ! -f "$model_dest" ] || [ "$(sha256sum < "$model_dest" | cut -d' ' -f1)" != "$MODEL_SHA256" ]; then
    say "copying the model to $model_dest"
    mkdir -p "$PREFIX/models"
    cp "$HERE/$MODEL_FILE" "$model_dest.partial"
    mv -f "$model_dest.partial" "$model_dest"
  fi
fi
id -u "$SERVICE_USER" >/dev/null 2>&1 \
  || useradd --system --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
mkdir -p "$STATE_DIR"
chown "$SERVICE_USER:" "$STATE_DIR"

ln -sfn "releases/$BUNDLE_ID" "$PREFIX/current.new"
mv -Tf "$PREFIX/current.new" "$PREFIX/current"
for old in "$PREFIX"/releases/*; do
  [ "$old" = "$RELEASE" ] || rm -rf "$old"
done

unit="$UNIT_DIR/$SERVICE.service"
changed=0
if ! cmp -s "$HERE/systemd/$SERVICE.service" "$unit"; then
  mkdir -p "$UNIT_DIR"
  cp "$HERE/systemd/$SERVICE.service" "$unit.partial"
  mv -f "$unit.partial" "$unit"
  changed=1
fi
[ "$(cat "$PREFIX/installed-bundle" 2>/dev/null)" = "$BUNDLE_ID" ] || echo "$BUNDLE_ID" > "$PREFIX/installed-bundle"

if systemd_running; then
  systemctl daemon-reload
  systemctl enable "$SERVICE.service" >/dev/null
  if [ "$changed" = 1 ]; then systemctl restart "$SERVICE.service"; else systemctl start "$SERVICE.service"; fi
  say "service $SERVICE is running; check it with $HERE/healthcheck.sh"
else
  say "systemd is not running here: start the service with its ExecStart line from $unit"
fi
say "done in ${SECONDS} s (bundle $BUNDLE_ID)"
