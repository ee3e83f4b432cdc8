"""Texts shipped with edgellm (written for the project, Apache-2.0): calibration and held-out evaluation."""
from __future__ import annotations

from importlib import resources


def _read(name: str) -> str:
    return resources.files("edgellm").joinpath("data", name).read_text(encoding="utf-8")


def calibration_text() -> str:
    return _read("calibration.txt")


def heldout_text() -> str:
    return _read("heldout.txt")
