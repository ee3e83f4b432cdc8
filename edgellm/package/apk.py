"""`edgellm package android --apk`: a signed debug APK assembled offline, without Gradle or the SDK.

What Android Studio's build would do, done with the Debian tools that exist here:
  resources   aapt2 compile + link against framework-res.apk (API 29): AndroidManifest.xml, app name
  code        smali assembles the app's Java side (android/apk/smali) into classes.dex (there is no d8)
  native      edgellm's engine + JNI bridge compiled with clang for <arch>-linux-android24
              (edgellm.package.jnibuild), beside Microsoft's onnxruntime and onnxruntime-genai
              libraries from the pinned AARs (debug info stripped, code untouched)
  assets      the onnxruntime-genai model folder and the app manifest, stored uncompressed
  zip         written with 16 KB-aligned native libraries (ziptools; zipalign -p stops at 4 KB)
  signature   apksigner v2 + v3 with a per-user debug key (keytool), then verified
"""
from __future__ import annotations

import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from ..atomic import atomic_path
from ..errors import PackagingError
from . import elfinfo, jnibuild, natives, tools, ziptools

Progress = Callable[[str, int, int], None]
TARGET_SDK = 34
DEFAULT_ABIS = ("arm64-v8a",)
KEY_ALIAS = "androiddebugkey"
KEY_PASS = "android"   # the Android SDK's well-known debug-key password: a debug APK only


def template_dir() -> Path:
    """The Android template (the repository's android/ folder, installed as edgellm.android_template)."""
    from importlib import resources

    try:
        return Path(str(resources.files("edgellm.android_template")))
    except ModuleNotFoundError:  # running from a source tree without an install
        return Path(__file__).resolve().parents[2] / "android"


@dataclass
class LibReport:
    name: str
    abi: str
    machine: str
    needed: tuple[str, ...]
    load_align: int
    bytes: int
    page_16k: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ApkResult:
    path: Path
    bytes: int
    seconds: float
    abis: tuple[str, ...]
    libs: list[LibReport]
    model_bytes: int
    compressed_libs: bool
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "bytes": self.bytes, "seconds": round(self.seconds, 2), "abis": list(self.abis),
                "model_bytes": self.model_bytes, "overhead_bytes": self.bytes - self.model_bytes,
                "compressed_libs": self.compressed_libs, "libs": [lib.to_dict() for lib in self.libs],
                "warnings": self.warnings}


def build_apk(model_dir: Path, manifest: dict, dest: Path, *, app_name: str, package: str,
              abis: tuple[str, ...] = DEFAULT_ABIS, compress_libs: bool = False,
              progress: Progress | None = None) -> ApkResult:
    """Assemble, sign and verify the APK at `dest` (written atomically).

    model_dir: an onnxruntime-genai model folder; manifest: the app manifest (edgellm.package.manifest),
    whose "files" name the folder's files to ship."""
    t0 = time.perf_counter()
    for tool in ("aapt2", "smali", "apksigner", "keytool", "java"):
        tools.need(tool)  # fail before any work, naming the package to install
    report = progress or (lambda stage, done, total: None)
    warnings: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".edgellm-apk-", dir=dest.parent if dest.parent.exists() else None) as t:
        work = Path(t)
        report("native", 0, len(abis))
        lib_entries, libs = [], []
        for i, abi in enumerate(abis):
            rt = natives.android_runtime(abi, work / f"runtime-{abi}", progress)
            jni = jnibuild.build_android(abi, rt.libs[1], rt.genai_header, work / "jni")
            for lib in (*rt.libs, jni.path):
                shipped = _strip(lib, work / "strip" / abi)
                info = elfinfo.read(shipped)
                if info.machine != elfinfo.ABI_MACHINE[abi]:
                    raise PackagingError(f"{lib.name} is {info.machine}, not {abi}")
                libs.append(LibReport(lib.name, abi, info.machine, info.needed, info.load_align,
                                      shipped.stat().st_size, info.page_ok()))
                if not info.page_ok():
                    warnings.append(f"{abi}/{lib.name} (from the pinned {_origin(lib.name)}) has "
                                    f"{info.load_align // 1024} KB segment alignment: it will not load on "
                                    "16 KB-page devices until its upstream build is relinked")
                lib_entries.append(ziptools.Entry(f"lib/{abi}/{lib.name}", shipped, compress_libs))
            report("native", i + 1, len(abis))
        report("resources", 0, 1)
        base = _link_resources(work, app_name, package, manifest, compress_libs)
        dex = _assemble_dex(work)
        report("resources", 1, 1)
        model_files = [model_dir / name for name in manifest["files"]]
        entries = _base_entries(base)
        entries.insert(1, ziptools.Entry("classes.dex", dex, True))
        entries += lib_entries
        manifest_json = _json_bytes(manifest)
        entries.append(ziptools.Entry("assets/edgellm/manifest.json", manifest_json, True))
        entries += [ziptools.Entry(f"assets/edgellm/model/{p.name}", p, False) for p in model_files]
        report("zip", 0, 1)
        unsigned = work / "unsigned.apk"
        ziptools.write_aligned_zip(unsigned, entries)
        report("zip", 1, 1)
        report("sign", 0, 1)
        with atomic_path(dest) as tmp:
            _sign(unsigned, tmp)
            verify(tmp)
            bad = ziptools.misaligned(tmp)
            if bad:
                raise PackagingError(f"APK entries lost their alignment in signing: {'; '.join(bad[:3])}")
        report("sign", 1, 1)
    model_bytes = sum(p.stat().st_size for p in model_files)
    return ApkResult(dest, dest.stat().st_size, time.perf_counter() - t0, tuple(abis), libs, model_bytes,
                     compress_libs, warnings)


def _origin(name: str) -> str:
    if name == "libedgellm_jni.so":
        return "edgellm build"
    pkg = natives.ONNXRUNTIME if name == "libonnxruntime.so" else natives.GENAI
    return f"{pkg.name}@{pkg.version} ({pkg.contains})"


def _strip(lib: Path, out_dir: Path) -> Path:
    """Debug sections dropped (libmat.so carries 29 MB of DWARF); code and symbols stay as shipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / lib.name
    strip = shutil.which("llvm-strip-14") or shutil.which("llvm-strip")
    if strip is None:
        shutil.copy2(lib, out)
        return out
    tools.run([strip, "--strip-debug", str(lib), "-o", str(out)], f"stripping {lib.name}")
    return out


def _render(src: Path, dest: Path, **values) -> None:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(env.from_string(src.read_text(encoding="utf-8")).render(**values), encoding="utf-8")


def _link_resources(work: Path, app_name: str, package: str, manifest: dict, compress_libs: bool) -> Path:
    tpl = template_dir() / "apk"
    values = {"package": package, "app_name": app_name, "version_code": 1,
              "version_name": str(manifest.get("edgellm", {}).get("version", "0.1")),
              "min_sdk": jnibuild.MIN_SDK, "target_sdk": TARGET_SDK,
              "extract_native_libs": "true" if compress_libs else "false"}
    _render(tpl / "AndroidManifest.xml", work / "res-src" / "AndroidManifest.xml", **values)
    _render(tpl / "res/values/strings.xml", work / "res-src" / "res/values/strings.xml", **values)
    aapt2 = tools.need("aapt2")
    compiled = work / "compiled.zip"
    tools.run([aapt2, "compile", "--dir", str(work / "res-src" / "res"), "-o", str(compiled)], "aapt2 compile")
    base = work / "base.apk"
    tools.run([aapt2, "link", "-o", str(base), "-I", str(tools.framework_res()),
               "--manifest", str(work / "res-src" / "AndroidManifest.xml"),
               "--min-sdk-version", str(jnibuild.MIN_SDK), "--target-sdk-version", str(TARGET_SDK),
               str(compiled)], "aapt2 link")
    return base


def _assemble_dex(work: Path) -> Path:
    out = work / "classes.dex"
    tools.run([tools.need("smali"), "assemble", "--api", str(jnibuild.MIN_SDK), "-o", str(out),
               str(template_dir() / "apk" / "smali")], "smali assemble")
    return out


def _base_entries(base: Path) -> list[ziptools.Entry]:
    """aapt2's manifest, resource table and resources; resources.arsc stored (Android 11+ requires it)."""
    out = []
    with zipfile.ZipFile(base) as z:
        for info in z.infolist():
            data = z.read(info)
            compress = info.filename != "resources.arsc" and info.compress_type != zipfile.ZIP_STORED
            out.append(ziptools.Entry(info.filename, data, compress))
    out.sort(key=lambda e: e.name != "AndroidManifest.xml")
    return out


def _json_bytes(manifest: dict) -> bytes:
    import json

    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def debug_keystore() -> Path:
    """A per-user debug signing key, made once (so reinstalling a rebuilt APK keeps the app's data)."""
    from platformdirs import user_cache_dir

    ks = Path(user_cache_dir("edgellm")) / "android" / "debug.keystore"
    if ks.is_file():
        return ks
    ks.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(ks) as tmp:
        tmp.unlink()  # keytool refuses to write into an existing (empty) file
        tools.run([tools.need("keytool"), "-genkeypair", "-keystore", str(tmp), "-storetype", "PKCS12",
                   "-storepass", KEY_PASS, "-keypass", KEY_PASS, "-alias", KEY_ALIAS, "-keyalg", "RSA",
                   "-keysize", "2048", "-validity", "10000", "-dname", "CN=edgellm debug,O=edgellm",
                   "-noprompt"], "keytool -genkeypair")
    return ks


def _sign(unsigned: Path, out: Path) -> None:
    # v1 (JAR) signing is off: minSdk 24 verifies v2, and v1 would rewrite the entries (and their padding)
    tools.run([tools.need("apksigner"), "sign", "--ks", str(debug_keystore()), "--ks-pass", f"pass:{KEY_PASS}",
               "--key-pass", f"pass:{KEY_PASS}", "--ks-key-alias", KEY_ALIAS, "--min-sdk-version",
               str(jnibuild.MIN_SDK), "--v1-signing-enabled", "false", "--v2-signing-enabled", "true",
               "--v3-signing-enabled", "true", "--out", str(out), str(unsigned)], "apksigner sign")


def verify(apk: Path) -> dict[str, bool]:
    """apksigner verify: which signature schemes verify (raises when the APK does not)."""
    out = tools.run([tools.need("apksigner"), "verify", "--verbose", "--min-sdk-version", str(jnibuild.MIN_SDK),
                     str(apk)], "apksigner verify")
    schemes = {}
    for line in out.splitlines():
        if line.startswith("Verified using") and ":" in line:
            key, value = line.split(":", 1)
            schemes[key.replace("Verified using", "").strip()] = value.strip() == "true"
    if not any(schemes.values()):
        raise PackagingError(f"apksigner verify found no valid signature in {apk.name}")
    return schemes


def badging(apk: Path) -> dict:
    """`aapt dump badging`, parsed: package, sdk levels, launchable activity, permissions, native code."""
    out = tools.run([tools.need("aapt"), "dump", "badging", str(apk)], "aapt dump badging")
    info: dict = {"permissions": [], "native_code": []}
    for line in out.splitlines():
        key, _, rest = line.partition(":")
        if key == "package":
            info["package"] = _attr(rest, "name")
        elif key in ("sdkVersion", "minSdkVersion"):
            info["min_sdk"] = int(rest.strip().strip("'"))
        elif key == "targetSdkVersion":
            info["target_sdk"] = int(rest.strip().strip("'"))
        elif key == "launchable-activity":
            info["launchable_activity"] = _attr(rest, "name")
        elif key == "uses-permission":
            info["permissions"].append(_attr(rest, "name"))
        elif key == "native-code":
            info["native_code"] = [a.strip("'") for a in rest.split()]
        elif key == "application-label":
            info["label"] = rest.strip().strip("'")
    return info


def _attr(text: str, name: str) -> str | None:
    marker = f"{name}='"
    if marker not in text:
        return None
    return text.split(marker, 1)[1].split("'", 1)[0]
