"""What an .mlpackage is made of, read without running it: structure checks, spec, edgellm's manifest, op counts.

Packages are untrusted input like GGUF files: before coremltools' native blob reader maps the weights,
the manifest, the spec file and the weight blob table are checked here (sizes, offsets within the file,
sentinels), so a truncated or foreign package fails with a one-line error instead of deep inside native
code. The blob table layout is coremltools' MIL storage format (milstorage: a 64-byte header with the
blob count, then per blob a 64-byte record — sentinel 0xDEADBEEF, dtype, size, data offset — before its
data, each aligned to 64 bytes); hand-written because coremltools offers no validator.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from edgellm.errors import BackendError, InvalidModelError, UnsupportedModelError, UsageError

MANIFEST_KEY = "edgellm.manifest"          # edgellm's facts (JSON) in the model's user-defined metadata
HF_NAME_KEY = "co.huggingface.exporters.name"   # what swift-transformers reads as the model's name
SPEC_LIMIT = 256 << 20                     # model.mlmodel holds the program, not the weights
_SENTINEL = 0xDEADBEEF
_ALIGN = 64
# the files swift-transformers' LanguageModelConfigurationFromHub reads from a model folder
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def coremltools():
    """coremltools, or a one-line error that says how to get a working one."""
    import numpy as np

    try:
        ct = _quiet_import()
    except ImportError as e:
        raise BackendError(f"coremltools is not installed (pip install 'edgellm[coreml]'): {e}") from None
    major, minor = (int(x) for x in np.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        raise UsageError(f"coremltools {ct.__version__} needs numpy < 2.4 (found {np.__version__}); "
                         "pip install 'edgellm[coreml]' pins a working numpy")
    return ct


def _quiet_import():
    """Import coremltools without its import-time warnings (no native Core ML off macOS, untested torch or
    scikit-learn versions) unless EDGELLM_LOG asks for debug output: they concern predict and converters edgellm
    does not use, and would land in every CLI run."""
    import logging
    import os
    import sys

    if "coremltools" in sys.modules or os.environ.get("EDGELLM_LOG", "").lower() in ("debug", "verbose", "1"):
        import coremltools
        return coremltools
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import coremltools
    finally:
        logger.setLevel(level)
    return coremltools


def _items(package: Path) -> dict[str, Path]:
    manifest = package / "Manifest.json"
    if not manifest.is_file():
        raise InvalidModelError(f"{package}: not a Core ML package (no Manifest.json)")
    if manifest.stat().st_size > 1 << 20:
        raise InvalidModelError(f"{package}: Manifest.json is implausibly large")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        entries = data["itemInfoEntries"]
        items = {e["name"]: package / "Data" / e["path"] for e in entries.values()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidModelError(f"{package}: unreadable Manifest.json ({e})") from None
    for name, path in items.items():
        if not path.resolve().is_relative_to(package.resolve()):
            raise InvalidModelError(f"{package}: Manifest.json points outside the package ({name})")
    return items


def check_package(package: str | Path) -> None:
    """Structure of a package edgellm will read: manifest, spec file, weight blob table. Raises InvalidModelError."""
    package = Path(package)
    if not package.is_dir():
        raise InvalidModelError(f"{package}: a Core ML package is a directory (.mlpackage)")
    items = _items(package)
    spec = items.get("model.mlmodel")
    if spec is None or not spec.is_file():
        raise InvalidModelError(f"{package}: the package has no model.mlmodel (truncated or not a model package)")
    if spec.stat().st_size > SPEC_LIMIT:
        raise InvalidModelError(f"{package}: model.mlmodel is larger than {SPEC_LIMIT >> 20} MiB")
    weights = items.get("weights")
    if weights is not None:
        for blob in sorted(weights.glob("*.bin")) if weights.is_dir() else []:
            check_blob_file(blob)


def check_blob_file(path: Path) -> int:
    """Walk a MIL weight file's blob records; returns the blob count or raises InvalidModelError."""
    size = path.stat().st_size
    bad = f"{path}: the weight file is truncated or corrupt"
    with open(path, "rb") as f:
        head = f.read(_ALIGN)
        if len(head) < 8:
            raise InvalidModelError(bad + " (no header)")
        count, version = struct.unpack_from("<II", head)
        if version not in (1, 2) or count > size // _ALIGN:
            raise InvalidModelError(bad + f" (header: {count} blobs, version {version})")
        pos = _ALIGN
        for i in range(count):
            f.seek(pos)
            rec = f.read(32)
            if len(rec) < 24:
                raise InvalidModelError(bad + f" (blob {i} record past the end)")
            sentinel, _dtype, n, offset = struct.unpack_from("<IIQQ", rec)
            if sentinel != _SENTINEL or offset < pos + _ALIGN or offset + n > size:
                raise InvalidModelError(bad + f" (blob {i}: {n} bytes at {offset}, file has {size})")
            pos = -(-(offset + n) // _ALIGN) * _ALIGN
    return count


def load_spec(package: str | Path):
    """The package's Model protobuf (coremltools reads it on any OS)."""
    ct = coremltools()
    try:
        return ct.utils.load_spec(str(package))
    except Exception as e:  # noqa: BLE001 - protobuf and coremltools raise assorted types for a damaged spec
        raise InvalidModelError(f"{package}: unreadable model.mlmodel ({str(e).splitlines()[0] if str(e) else e})"
                                ) from None


def read_manifest(spec, package: str | Path) -> dict[str, Any]:
    """edgellm's manifest from the metadata; a foreign package (no manifest) is refused with the reason."""
    text = spec.description.metadata.userDefined.get(MANIFEST_KEY)
    if not text:
        raise UnsupportedModelError(f"{package} was not written by edgellm (no {MANIFEST_KEY} metadata): "
                                    "convert the model with edgellm convert --format coreml")
    try:
        facts = json.loads(text)
    except ValueError as e:
        raise InvalidModelError(f"{package}: unreadable {MANIFEST_KEY} metadata ({e})") from None
    if not isinstance(facts, dict) or facts.get("format") != "edgellm-coreml":
        raise UnsupportedModelError(f"{package}: {MANIFEST_KEY} is not an edgellm Core ML manifest")
    return facts


def op_histogram(spec) -> dict[str, int]:
    """Op type -> count in the 'main' function, straight from the spec (no weights read)."""
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    counts: dict[str, int] = {}
    for op in block.operations:
        counts[op.type] = counts.get(op.type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def compressed_consumers(spec) -> set[str]:
    """The op types that read a compressed (constexpr) weight: edgellm compresses linear and gather weights only."""
    fn = spec.mlProgram.functions["main"]
    ops = fn.block_specializations[fn.opset].operations
    packed = {o.name for op in ops if op.type.startswith("constexpr_") for o in op.outputs}
    return {op.type for op in ops for arg in op.inputs.values() for a in arg.arguments if a.name in packed}


def io_contract(spec) -> dict[str, Any]:
    """Inputs (dtype, default shape, size ranges), states (dtype, shape) and outputs of the model description."""
    from coremltools.proto import FeatureTypes_pb2 as ft

    def dtype(arr) -> str:
        return ft.ArrayFeatureType.ArrayDataType.Name(arr.dataType)

    out: dict[str, Any] = {"inputs": {}, "states": {}, "outputs": {}}
    for feat in spec.description.input:
        arr = feat.type.multiArrayType
        out["inputs"][feat.name] = {"dtype": dtype(arr), "shape": list(arr.shape),
                                    "ranges": [[r.lowerBound, r.upperBound] for r in arr.shapeRange.sizeRanges]}
    for feat in spec.description.state:
        arr = feat.type.stateType.arrayType
        out["states"][feat.name] = {"dtype": dtype(arr), "shape": list(arr.shape)}
    for feat in spec.description.output:
        out["outputs"][feat.name] = {"dtype": dtype(feat.type.multiArrayType)}
    return out


def package_bytes(package: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(package).rglob("*") if p.is_file())
