#!/bin/bash
# Remove what install.sh put on this board. Safe to run again, or on a board where it never ran.
#   sudo ./uninstall.sh           keep the service's state (KV caches) in the state directory
#   sudo ./uninstall.sh --purge   remove that too, and the service user
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
need_root
purge=0
[ "${1:-}" = --purge ] && purge=1

unit="$UNIT_DIR/$SERVICE.service"
if systemd_running; then
  systemctl disable --now "$SERVICE.service" >/dev/null 2>&1 || true
fi
if [ -f "$unit" ]; then
  rm -f "$unit"
  say "removed $unit"
  if systemd_running; then systemctl daemon-reload; fi
fi
if [ -d "$PREFIX" ]; then
  rm -rf "$PREFIX"
  say "removed $PREFIX"
fi
if [ "$purge" = 1 ]; then
  rm -rf "$STATE_DIR"
  if id -u "$SERVICE_USER" >/dev/null 2>&1; then userdel "$SERVICE_USER" && say "removed user $SERVICE_USER"; fi
fi
say "done"
