"""`edgellm package android`: a Gradle project around a model, and (ONNX) a signed APK built offline.

The project is the template in the repository's android/ folder (installed as
edgellm.android_template), rendered with the model's facts; the model, its app manifest and, for
llama.cpp, the shipped system-prompt state go into the app's assets. See docs/mobile.md.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import jinja2

from .. import store
from ..atomic import atomic_path
from ..errors import UsageError
from . import apk as apkmod
from . import jnibuild, natives, source

Progress = Callable[[str, int, int], None]
BACKENDS = ("onnx", "llama.cpp")
DEFAULT_PACKAGE = "ai.edgellm.demo"
APK_NAME = "edgellm-chat-debug.apk"


@dataclass
class AndroidPackage:
    out: Path
    backend: str
    manifest: dict
    files: list[str]
    seconds: float
    apk: apkmod.ApkResult | None = None
    state: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        m = self.manifest
        return {"output": str(self.out), "backend": self.backend, "seconds": round(self.seconds, 2),
                "model": m["model"], "runtime": m["runtime"], "memory": m["memory"],
                "system_state": None if not self.state else {k: v for k, v in self.state.items() if k != "tokens"},
                "apk": self.apk.to_dict() if self.apk else None, "files": len(self.files), "warnings": self.warnings}


def package_android(model: str | os.PathLike | None, out: str | os.PathLike, *, system: str | None = None,
                    backend: str | None = None, apk: bool = False, force: bool = False,
                    abis: tuple[str, ...] = apkmod.DEFAULT_ABIS, phone: str = "android-4gb", n_ctx: int = 2048,
                    max_tokens: int = 512, threads: int | None = None, app_name: str = "edgellm chat",
                    package: str = DEFAULT_PACKAGE, compress_libs: bool = False,
                    progress: Progress | None = None) -> AndroidPackage:
    """Write the Android project for `model` at `out` (see `edgellm package android --help`)."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} exists: choose another directory or pass --force to replace it")
    if apk and ((backend or "").lower() == "llama.cpp" or (backend is None and store.resolve(model).kind != "onnx")):
        raise UsageError("--apk builds the ONNX backend (llama.cpp's Android libraries need libc++, which "
                         "cannot be built here): package an ONNX export (edgellm convert --format onnx), or drop --apk")
    for abi in abis:
        if abi not in jnibuild.TRIPLES:
            raise UsageError(f"unknown ABI {abi!r}: choose from {', '.join(jnibuild.TRIPLES)}")
    if not _valid_package(package):
        raise UsageError(f"{package!r} is not a valid Android application id (e.g. com.example.chat)")
    src = source.prepare(model, backend, system=system, target="android", phone=phone, n_ctx=n_ctx,
                         max_tokens=max_tokens, threads=threads, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, directory=True) as tmp:
        assets = tmp / "app/src/main/assets/edgellm"
        model_dir = assets / "model"
        model_dir.mkdir(parents=True)
        for f in src.files:
            _place(f, model_dir / f.name)
        if src.state_file is not None:
            _place(src.state_file, model_dir / src.state_file.name)
        (assets / "manifest.json").write_text(json.dumps(src.manifest, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
        _write_project(tmp, src, app_name=app_name, package=package, abis=abis)
        apk_result = None
        if apk:
            apk_result = apkmod.build_apk(model_dir, src.manifest, tmp / APK_NAME, app_name=app_name,
                                          package=package, abis=abis, compress_libs=compress_libs,
                                          progress=progress)
        _write_readme(tmp, src, app_name=app_name, abis=abis, apk=apk_result, phone=phone)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    if apk_result is not None:
        apk_result.path = out / APK_NAME  # where it is now that the directory is in place
    warnings = list(src.warnings) + (apk_result.warnings if apk_result else [])
    return AndroidPackage(out, src.backend, src.manifest, files, time.perf_counter() - t0, apk_result,
                          src.manifest.get("system_state"), warnings)


def _valid_package(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and all(p and p[0].isalpha() and p.replace("_", "").isalnum() and p.isascii()
                                   for p in parts)


def _place(src: Path, dest: Path) -> None:
    """Hard-link when possible (same disk: no copy of a large model), else copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
    os.chmod(dest, 0o644)


def _env() -> jinja2.Environment:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _write_project(root: Path, src, *, app_name: str, package: str, abis: tuple[str, ...]) -> None:
    tpl = apkmod.template_dir() / "gradle"
    values = _values(src, app_name=app_name, package=package, abis=abis)
    env = _env()
    for path in sorted(tpl.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(tpl)
        if rel.name == "README.md.j2":
            continue  # written last, with what was built
        dest = root / (str(rel)[:-3] if rel.name.endswith(".j2") else str(rel))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.name.endswith(".j2"):
            dest.write_text(env.from_string(path.read_text(encoding="utf-8")).render(**values), encoding="utf-8")
        else:
            shutil.copy2(path, dest)
    cpp = root / "edgellm/src/main/cpp"
    engine = "engine_genai.c" if src.backend == "onnx" else "engine_llama.c"
    for name in ("edgellm_engine.h", engine, "jni_bridge.c"):
        shutil.copy2(jnibuild.native_dir() / name, cpp / name)
    if src.backend == "onnx":
        _local_maven(root / "maven-local")
    else:
        _copy_llama_source(cpp / "llama.cpp")


def _values(src, *, app_name: str, package: str, abis: tuple[str, ...]) -> dict:
    from xml.sax.saxutils import escape

    rt = src.manifest["runtime"]
    return {"backend": src.backend, "project_name": "edgellm-chat", "package": package,
            "app_name": escape(app_name), "min_sdk": jnibuild.MIN_SDK, "abis": ", ".join(f'"{a}"' for a in abis),
            "version_name": src.manifest["edgellm"]["version"], "ort_version": natives.ORT_VERSION,
            "genai_version": natives.GENAI_VERSION,
            "llama_build": f"b{natives.LLAMA_CPP_BUILD}-{natives.LLAMA_CPP_COMMIT}", "runtime": rt["name"],
            "provider": rt["provider"]}


def _local_maven(repo: Path) -> None:
    """Microsoft's two AARs as a Maven repository the project resolves offline (see settings.gradle.kts)."""
    intro = ("Byte-identical copies of Microsoft's AARs from the pinned npm packages edgellm fetched "
             "(version and tarball sha256 checked):")
    lines = ["# Local Maven repository", "", intro, ""]
    for pkg, artifact, version, aar in (
            (natives.ONNXRUNTIME, "onnxruntime-android", natives.ORT_VERSION, "Plugins/Android/onnxruntime.aar"),
            (natives.GENAI, "onnxruntime-genai-android", natives.GENAI_VERSION,
             "Plugins/Android/onnxruntime-genai.aar")):
        d = repo / "com/microsoft/onnxruntime" / artifact / version
        d.mkdir(parents=True, exist_ok=True)
        src = natives.fetch(pkg) / aar
        _place(src, d / f"{artifact}-{version}.aar")
        (d / f"{artifact}-{version}.pom").write_text(
            '<?xml version="1.0" encoding="UTF-8"?>\n<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
            "  <modelVersion>4.0.0</modelVersion>\n  <groupId>com.microsoft.onnxruntime</groupId>\n"
            f"  <artifactId>{artifact}</artifactId>\n  <version>{version}</version>\n  <packaging>aar</packaging>\n"
            "</project>\n", encoding="utf-8")
        lines.append(f"- `com.microsoft.onnxruntime:{artifact}:{version}` — sha256 `{natives.sha256_file(src)}`, "
                     f"from npm `{pkg.name}@{pkg.version}` (tarball sha256 `{pkg.sha256}`)")
    (repo / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _copy_llama_source(dest: Path) -> None:
    """llama.cpp's library sources (CMake files, include, src, ggml): what add_subdirectory needs."""
    src = natives.llama_source()
    keep = ("CMakeLists.txt", "cmake", "include", "src", "ggml", "LICENSE", "vendor")
    for name in keep:
        p = src / name
        if p.is_dir():
            shutil.copytree(p, dest / name, ignore=shutil.ignore_patterns("*.metal", "ggml-metal"))
        elif p.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest / name)
    # llama.cpp's CMakeLists also looks at common/ and tools/ only when they are enabled (they are not)


def _write_readme(root: Path, src, *, app_name: str, abis: tuple[str, ...], apk, phone: str) -> None:
    m = src.manifest
    fit = m["memory"]
    values = {**_values(src, app_name=app_name, package="", abis=abis), "model_name": m["model"]["name"],
              "date": date.today().isoformat(), "n_ctx": m["runtime"]["n_ctx"], "state": m.get("system_state"),
              "model_files": ", ".join(m["files"]) + (", system.kv (the system prompt's KV state)"
                                                      if m.get("system_state") else ""),
              "apk": APK_NAME if apk else None, "model_mib": round(m["model"]["bytes"] / 2**20),
              "phone": phone, "fit": fit["message"],
              "warnings": "; ".join(src.warnings + (apk.warnings if apk else []))}
    values["app_name"] = app_name
    tpl = apkmod.template_dir() / "gradle" / "README.md.j2"
    (root / "README.md").write_text(_env().from_string(tpl.read_text(encoding="utf-8")).render(**values),
                                    encoding="utf-8")
