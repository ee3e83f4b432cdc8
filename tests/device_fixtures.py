"""Load the recorded device fixtures in tests/fixtures/devices into DeviceProfiles."""
from __future__ import annotations

from pathlib import Path

from edgellm.device import DeviceProfile, parse_getprop, parse_key_values, probe_from

FIXTURES = Path(__file__).parent / "fixtures" / "devices"
NAMES = ("rpi4", "rpi5", "android-pixel", "x86-avx512", "mac-m2", "x86-vm-recorded")
# written by hand from documented formats (README.md here); only these were recorded by record_fixture on the device
RECORDED = ("x86-vm-recorded",)


def load_fixture(name: str) -> DeviceProfile:
    """Probe a recorded device: its files as the root, sysctl/getprop/uname from the text dumps beside them."""
    root = FIXTURES / name
    if not root.is_dir():
        raise FileNotFoundError(f"no device fixture {name!r} under {FIXTURES}")
    sysctl = getprop = None
    if (root / "sysctl.txt").is_file():
        sysctl = parse_key_values((root / "sysctl.txt").read_text())
    if (root / "getprop.txt").is_file():
        getprop = parse_getprop((root / "getprop.txt").read_text())
    system, machine = (root / "uname.txt").read_text().split()[:2]
    return probe_from(root, sysctl=sysctl, getprop=getprop, system=system, machine=machine)
