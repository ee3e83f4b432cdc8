"""`edgellm package ios`: a Swift package (EdgeLLM) around a model, and a SwiftUI demo app project.

llama.cpp path: the package's C target is edgellm's engine (native/engine_llama.c, the same file the
Android app and the host checks run) over the pinned llama.xcframework (a binaryTarget), with the
GGUF, the app manifest and the shipped system-prompt state as resources. Core ML path: a Swift
generation loop over the stateful .mlpackage (MLState, iOS 18) with swift-transformers' tokenizer.
The demo app's Xcode project is rendered from a template and its sources added with pbxproj.
Nothing here can compile Swift (no toolchain on Linux): see docs/mobile.md for what is checked instead.
"""
from __future__ import annotations

import contextlib
import io
import os
import plistlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import jinja2

from ..atomic import atomic_path
from ..errors import UsageError
from . import jnibuild, natives, source

Progress = Callable[[str, int, int], None]
IOS_MIN = {"llama.cpp": "16.4", "coreml": "18.0"}   # llama.xcframework's minimum; MLState needs iOS 18
SWIFT_TRANSFORMERS = "0.1.17"
DEMO_SOURCES = ("EdgeLLMDemoApp.swift", "ChatView.swift")
PRODUCT_DEPENDENCY = "E0000000000000000000D001"   # ids in the project template
FRAMEWORKS_PHASE = "E0000000000000000000A002"


@dataclass
class IosPackage:
    out: Path
    backend: str
    manifest: dict
    files: list[str]
    seconds: float
    state: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        m = self.manifest
        return {"output": str(self.out), "backend": self.backend, "seconds": round(self.seconds, 2),
                "model": m["model"], "runtime": m["runtime"], "memory": m["memory"],
                "system_state": None if not self.state else {k: v for k, v in self.state.items() if k != "tokens"},
                "apk": None, "files": len(self.files), "warnings": self.warnings}


def template_dir() -> Path:
    return Path(__file__).parent / "templates" / "ios"


def package_ios(model: str | os.PathLike | None, out: str | os.PathLike, *, system: str | None = None,
                backend: str | None = None, force: bool = False, phone: str = "iphone-6gb", n_ctx: int = 2048,
                max_tokens: int = 512, threads: int | None = None, app_name: str = "edgellm chat",
                bundle_id: str = "ai.edgellm.demo", progress: Progress | None = None) -> IosPackage:
    """Write the Swift package and demo app for `model` at `out` (see `edgellm package ios --help`)."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} exists: choose another directory or pass --force to replace it")
    parts = bundle_id.split(".")
    if len(parts) < 2 or not all(p and p.replace("-", "").isalnum() and p.isascii() for p in parts):
        raise UsageError(f"{bundle_id!r} is not a valid bundle identifier (e.g. com.example.chat)")
    src = source.prepare(model, backend, system=system, target="ios", phone=phone, n_ctx=n_ctx,
                         max_tokens=max_tokens, threads=threads, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, directory=True) as tmp:
        resources = _write_package(tmp / "EdgeLLM", src)
        warnings = list(src.warnings)
        if src.backend == "llama.cpp":
            warnings += _check_xcframework(tmp / "EdgeLLM/Frameworks/llama.xcframework", tmp / ".check")
        _write_demo(tmp / "EdgeLLMDemo", src, app_name=app_name, bundle_id=bundle_id)
        _write_readme(tmp, src, app_name=app_name, resources=resources, phone=phone)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return IosPackage(out, src.backend, src.manifest, files, time.perf_counter() - t0,
                      src.manifest.get("system_state"), warnings)


def _check_xcframework(xcframework: Path, work: Path) -> list[str]:
    """The link step Xcode would fail at, done now: slices, minimum iOS, every symbol the engine calls."""
    from ..errors import MissingToolError, PackagingError
    from . import macho

    try:
        problems = macho.check_llama_xcframework(xcframework, work)
    except MissingToolError as e:
        return [f"the xcframework was not checked: {e}"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if problems:
        raise PackagingError(f"{xcframework.name} does not fit the engine: {'; '.join(problems)}")
    return []


def _env() -> jinja2.Environment:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _place(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest)
        return
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
    os.chmod(dest, 0o644)


def _write_package(root: Path, src) -> list[str]:
    """Package.swift, the Swift sources, the C engine (llama.cpp) and the resources; returns resource names."""
    import json

    tpl = template_dir() / "EdgeLLM"
    res = root / "Sources/EdgeLLM/Resources"
    res.mkdir(parents=True)
    for f in src.files:
        _place(f, res / ("model.mlpackage" if f.suffix == ".mlpackage" else f.name))
    if src.state_file is not None:
        _place(src.state_file, res / src.state_file.name)
    (res / "manifest.json").write_text(json.dumps(src.manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    resources = sorted(p.name for p in res.iterdir())
    swift = tpl / "Sources/EdgeLLM"
    shutil.copy2(swift / "Manifest.swift", root / "Sources/EdgeLLM/Manifest.swift")
    if src.backend == "llama.cpp":
        shutil.copy2(swift / "EdgeLLM.swift", root / "Sources/EdgeLLM/EdgeLLM.swift")
        core = root / "Sources/EdgeLLMCore"
        (core / "include").mkdir(parents=True)
        shutil.copy2(jnibuild.native_dir() / "engine_llama.c", core / "engine_llama.c")
        shutil.copy2(jnibuild.native_dir() / "edgellm_engine.h", core / "include/edgellm_engine.h")
        _place(natives.llama_xcframework(), root / "Frameworks/llama.xcframework")
    else:
        shutil.copy2(swift / "CoreMLEngine.swift", root / "Sources/EdgeLLM/EdgeLLM.swift")
    values = {"backend": src.backend, "ios_min": IOS_MIN[src.backend], "resources": resources,
              "llama_build": f"b{natives.LLAMA_CPP_BUILD}-{natives.LLAMA_CPP_COMMIT}",
              "swift_transformers": SWIFT_TRANSFORMERS}
    (root / "Package.swift").write_text(_env().from_string((tpl / "Package.swift.j2").read_text()).render(**values),
                                        encoding="utf-8")
    return resources


def _write_demo(root: Path, src, *, app_name: str, bundle_id: str) -> None:
    """The SwiftUI app: the project file rendered from the template, its sources added with pbxproj."""
    from pbxproj import XcodeProject
    from pbxproj.pbxsections import PBXBuildFile

    tpl = template_dir() / "EdgeLLMDemo"
    app = root / "EdgeLLMDemo"
    app.mkdir(parents=True)
    for name in DEMO_SOURCES:
        shutil.copy2(tpl / "EdgeLLMDemo" / name, app / name)
    with open(app / "Info.plist", "wb") as f:
        plistlib.dump(info_plist(app_name), f)
    proj = root / "EdgeLLMDemo.xcodeproj"
    proj.mkdir()
    text = _env().from_string((tpl / "EdgeLLMDemo.xcodeproj/project.pbxproj.j2").read_text()).render(
        ios_min=IOS_MIN[src.backend], bundle_id=bundle_id, version=src.manifest["edgellm"]["version"])
    (proj / "project.pbxproj").write_text(text, encoding="utf-8")
    project = XcodeProject.load(str(proj / "project.pbxproj"))
    group = project.get_groups_by_name("EdgeLLMDemo")[0]
    for name in DEMO_SOURCES:
        project.add_file(f"EdgeLLMDemo/{name}", parent=group, target_name="EdgeLLMDemo", force=False)
    # link the EdgeLLM package product; added last: pbxproj's add_file expects every build file to
    # reference a file, and a package product is referenced by productRef instead
    link = PBXBuildFile.create(project.get_object(PRODUCT_DEPENDENCY), is_product=True)
    project.objects[link.get_id()] = link
    project.get_object(FRAMEWORKS_PHASE).files.append(link.get_id())
    with contextlib.redirect_stderr(io.StringIO()):  # pbxproj narrates its comment lookups on stderr
        project.save()


def info_plist(app_name: str) -> dict:
    return {"CFBundleDevelopmentRegion": "$(DEVELOPMENT_LANGUAGE)", "CFBundleDisplayName": app_name,
            "CFBundleExecutable": "$(EXECUTABLE_NAME)", "CFBundleIdentifier": "$(PRODUCT_BUNDLE_IDENTIFIER)",
            "CFBundleInfoDictionaryVersion": "6.0", "CFBundleName": "$(PRODUCT_NAME)", "CFBundlePackageType": "APPL",
            "CFBundleShortVersionString": "$(MARKETING_VERSION)", "CFBundleVersion": "$(CURRENT_PROJECT_VERSION)",
            "LSRequiresIPhoneOS": True, "UILaunchScreen": {},
            "UIApplicationSceneManifest": {"UIApplicationSupportsMultipleScenes": False},
            "UISupportedInterfaceOrientations": ["UIInterfaceOrientationPortrait"]}


def _write_readme(root: Path, src, *, app_name: str, resources: list[str], phone: str) -> None:
    m = src.manifest
    values = {"app_name": app_name, "model_name": m["model"]["name"], "backend": src.backend,
              "date": date.today().isoformat(), "ios_min": IOS_MIN[src.backend], "resources": resources,
              "runtime": f"{m['runtime']['name']} {m['runtime']['version']}", "n_ctx": m["runtime"]["n_ctx"],
              "state": m.get("system_state"), "phone": phone, "fit": m["memory"]["message"],
              "llama": natives.LLAMARN, "model_mib": round(m["model"]["bytes"] / 2**20)}
    text = _env().from_string((template_dir() / "README.md.j2").read_text(encoding="utf-8")).render(**values)
    (root / "README.md").write_text(text, encoding="utf-8")
