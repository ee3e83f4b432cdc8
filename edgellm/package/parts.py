"""What every packaging path hands the app writers: the Source record, the phone as the planner sees it, and
a token count by the model's own tokenizer. Its own module so the Core ML path (package/coreml.py) and the
GGUF/ONNX paths (package/source.py) share it without importing each other.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import memplan
from ..device import DeviceProfile
from . import manifest as manifests


@dataclass
class Source:
    backend: str
    path: Path
    files: list[Path]
    manifest: dict
    chat: manifests.ChatPieces
    state_file: Path | None = None
    warnings: list[str] = field(default_factory=list)
    staging: tempfile.TemporaryDirectory | None = None   # generated files live here until packaged


def phone_profile(board: memplan.Board, target: str) -> DeviceProfile:
    """A phone class as the planner sees a device: big cores do the work, as on the Pixel fixture."""
    features = ("asimd", "dotprod", "fp16") if board.dotprod else ("asimd",)
    big = 4 if target == "android" else 2
    return DeviceProfile(os="android" if target == "android" else "darwin", arch="aarch64", cpu_model=board.cpu,
                         features=features, logical_cores=board.cores, physical_cores=board.cores,
                         performance_cores=big, efficiency_cores=board.cores - big, ram_bytes=board.ram_bytes,
                         ram_available_bytes=int(board.usable_bytes / 0.9), metal=target == "ios",
                         nnapi=target == "android", android_sdk=34 if target == "android" else None, board=board.name)


def count_tokens(model_dir: Path, text: str) -> int:
    try:
        from tokenizers import Tokenizer
    except ImportError:  # no tokenizer library: bound by bytes (a token is at least one byte)
        return len(text.encode())
    return len(Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids)
