"""An emulated Raspberry Pi OS board for tests: a minimal Debian 12 arm64 root run under qemu-user.

The root is Debian bookworm minbase + python3 — what Raspberry Pi OS Lite (64-bit) has that matters
here — with no compiler and no libgomp, so a bundle that forgot a runtime library fails to load.
It is made without binfmt_misc (a host-kernel setting a container should not touch): debootstrap's
first stage downloads and unpacks, the remaining packages are unpacked natively with dpkg-deb (their
maintainer scripts would only byte-compile Python and register alternatives), and programs run with
proot, which emulates chroot and runs every aarch64 executable (including ones started by scripts)
through qemu-aarch64-static. The root is cached under the user cache dir, keyed by its package list.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ("python3",)  # on top of minbase (apt, bash, coreutils, passwd, libstdc++6 ...)
MIRROR = os.environ.get("EDGELLM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
RECIPE = "1"
QEMU = "qemu-aarch64-static"
APT_TOOLS = {"debootstrap": "debootstrap", QEMU: "qemu-user-static", "proot": "proot"}


def cache_root() -> Path:
    from edgellm.deploy.crossbuild import cache_root as cross

    return cross().parent


def missing_tools() -> list[str]:
    return [pkg for tool, pkg in APT_TOOLS.items() if shutil.which(tool) is None]


def arm64_root() -> Path:
    """The cached root, made on first use (about a minute plus the ~40 MB download)."""
    key = hashlib.sha256(f"{SUITE}|{','.join(PACKAGES)}|{RECIPE}".encode()).hexdigest()[:12]
    dest = cache_root() / f"arm64-root-{SUITE}-{key}"
    if (dest / ".edgellm-complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / ".edgellm-complete").exists():
            return dest
        tmp = dest.with_name(f".{dest.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        _make_root(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest


def _make_root(root: Path) -> None:
    subprocess.run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
                    f"--include={','.join(PACKAGES)}", SUITE, str(root), MIRROR],
                   check=True, capture_output=True)
    archives = root / "var/cache/apt/archives"
    for deb in sorted(archives.glob("*.deb")):
        data = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)], stdin=data.stdout,
                       check=True)
        if data.wait() != 0:
            raise RuntimeError(f"could not unpack {deb.name}")
        deb.unlink()
    proc = root / "proc"
    if proc.is_symlink():
        proc.unlink()
    proc.mkdir(exist_ok=True)
    etc = root / "etc"
    for name in ("passwd", "group"):  # what base-passwd's postinst would write
        if not (etc / name).is_file() or not (etc / name).read_text().strip():
            shutil.copy2(root / f"usr/share/base-passwd/{name}.master", etc / name)
    for name, fields in (("shadow", 9), ("gshadow", 4)):
        src = (etc / ("passwd" if name == "shadow" else "group")).read_text().splitlines()
        (etc / name).write_text("".join(line.split(":")[0] + ":*" + ":" * (fields - 2) + "\n" for line in src))
    subprocess.run([QEMU, str(root / "sbin/ldconfig"), "-r", str(root)], check=True, capture_output=True)
    (root / ".edgellm-complete").write_text(f"{SUITE} {' '.join(PACKAGES)}\n")


# proot 5.1 (Debian 12) does not translate the newer faccessat2 syscall that glibc 2.36's access()
# uses, so every os.access() in the emulated board fails (click's readable-file checks, shutil.which).
# On a real board it works; here Python gets root's answer from stat(), which proot does translate.
ACCESS_SHIM = """
# edgellm test shim for proot: os.access from stat() (see tests/emulated_board.py)
import os as _os, stat as _stat
_real_access = _os.access
def _access(path, mode, *, dir_fd=None, effective_ids=False, follow_symlinks=True):
    if _real_access(path, mode, dir_fd=dir_fd, effective_ids=effective_ids, follow_symlinks=follow_symlinks):
        return True
    try:
        st = _os.stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
    except OSError:
        return False
    return not (mode & _os.X_OK) or _stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
_os.access = _access
"""


def prepare_board(root: Path) -> None:
    """Apply the emulation shims to a copy of the cached root (the cache itself stays pristine)."""
    site = root / "etc/python3.11/sitecustomize.py"
    site.write_text(site.read_text() + ACCESS_SHIM)


def command(root: Path, argv: Sequence[str], *, binds: Mapping[str, str] = {}, cwd: str = "/",
            env: Mapping[str, str] | None = None) -> list[str]:
    """argv (a path inside the root) as a proot command line: root is /, aarch64 runs under qemu."""
    bind = [f"--bind={host}:{guest}" for host, guest in binds.items()]
    base_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                "HOME": "/root"}
    env_args = [f"{k}={v}" for k, v in {**base_env, **(env or {})}.items()]
    return ["proot", "-0", "-r", str(root), "-q", QEMU, "--bind=/proc", "--bind=/dev", "--bind=/sys", *bind,
            "-w", cwd, "/usr/bin/env", "-i", *env_args, *argv]


def run(root: Path, argv: Sequence[str], *, timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(command(root, argv, **kw), capture_output=True, text=True, timeout=timeout)
