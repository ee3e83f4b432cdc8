# Sourced by install.sh, uninstall.sh and healthcheck.sh: the bundle's settings and shared helpers.
# shellcheck shell=bash
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=/dev/null
. "$HERE/bundle.env"
PREFIX=${EDGELLM_PREFIX:-/opt/edgellm}
UNIT_DIR=${EDGELLM_UNIT_DIR:-/etc/systemd/system}
STATE_DIR=${EDGELLM_STATE_DIR:-/var/lib/edgellm}
ME=$(basename "$0" .sh)

say() { printf 'edgellm %s: %s\n' "$ME" "$*"; }
die() { printf 'edgellm %s: error: %s\n' "$ME" "$*" >&2; exit 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0)"; }
systemd_running() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }
