"""edgellm package android: the Gradle project, the offline APK and the app's C engine, on the real model.

What a phone would run is checked here as far as a Linux host allows: the APK is read back with the
Android tools (apksigner, aapt, dexdump), its ELF libraries and zip layout are inspected, its dex is
translated to JVM bytecode (enjarify) and drives the same JNI C compiled for x86-64 against the host
onnxruntime-genai; the llama.cpp path's shipped state is restored by a host build of the llama.cpp
version the app ships. Slow fixtures: the ONNX export (~80 s), the APK (~15 s), llama.cpp's host build
(minutes, once per machine; .ci/setup.sh builds it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

import edgellm
from edgellm import memplan
from edgellm.errors import (
    ContextOverflowError,
    InsufficientMemoryError,
    MissingToolError,
    PackagingError,
    UnsupportedModelError,
    UsageError,
)
from edgellm.package import elfinfo, natives, tools, ziptools
from edgellm.package.android import APK_NAME, package_android
from edgellm.package.manifest import chat_pieces

SYSTEM = ("You are the guide of a small science museum. Visitors ask about the exhibits: the Foucault pendulum, "
          "the Tesla coil, the meteorite collection and the planetarium. Answer in one or two friendly sentences, "
          "say when you do not know, and never invent opening hours or ticket prices; point visitors to the front "
          "desk for those. Keep every answer suitable for children.")
QUESTION = "What is the capital of France?"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ANDROID_TOOLS = ("aapt2", "aapt", "apksigner", "smali", "dexdump", "clang-14", "ld.lld-14", "keytool", "npm")
needs_tools = pytest.mark.skipif(any(shutil.which(t) is None for t in ANDROID_TOOLS),
                                 reason="Android packaging tools missing (run .ci/setup.sh)")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def onnx_dir(module_tmp) -> Path:
    """The default model as edgellm's int4 ONNX export (what the APK ships). Not the shorter-calibrated int4 of
    tests/model_fixtures.py: the engine's multi-turn test compares greedy texts, and on that export a near tie
    between batch and single-step rounding flips the second turn's first token."""
    from edgellm.converters.onnx_export import convert_to_onnx

    return Path(convert_to_onnx("smollm2-135m", module_tmp / "smol-int4").output)


@pytest.fixture(scope="module")
def onnx_app(onnx_dir, module_tmp):
    return package_android(onnx_dir, module_tmp / "onnx-app", apk=True, system=SYSTEM)


@pytest.fixture(scope="module")
def apk(onnx_app) -> Path:
    return onnx_app.out / APK_NAME


@pytest.fixture(scope="module")
def llama_app(module_tmp):
    return package_android("smollm2-135m", module_tmp / "llama-app", system=SYSTEM)


def _apk_member(apk: Path, name: str, dest: Path) -> Path:
    with zipfile.ZipFile(apk) as z:
        dest.write_bytes(z.read(name))
    return dest


def _greedy_edgellm(model, prompt_text: str, n: int) -> list[int]:
    with edgellm.load(model, n_ctx=2048, disk_cache=False, sampler=edgellm.GREEDY) as s:
        return s.generate(prompt_text, max_tokens=n).tokens


# ---------------------------------------------------------------- the APK, read back with Android's tools


@pytest.mark.slow
@needs_tools
def test_apk_signature_verifies_with_v2_and_v3(apk):
    out = subprocess.run(["apksigner", "verify", "--verbose", str(apk)], capture_output=True, text=True, check=True)
    assert "Verified using v2 scheme (APK Signature Scheme v2): true" in out.stdout
    assert "Verified using v3 scheme (APK Signature Scheme v3): true" in out.stdout


@pytest.mark.slow
@needs_tools
def test_apk_badging_launchable_offline_app(apk):
    from edgellm.package.apk import badging

    info = badging(apk)
    assert info["package"] == "ai.edgellm.demo"
    assert info["launchable_activity"] == "ai.edgellm.demo.ChatActivity"
    assert info["min_sdk"] == 24 and info["target_sdk"] >= 33
    assert info["permissions"] == []              # no INTERNET: the model is inside
    assert info["native_code"] == ["arm64-v8a"]


@pytest.mark.slow
@needs_tools
def test_dex_native_methods_all_have_jni_symbols(apk, tmp_path):
    dex = _apk_member(apk, "classes.dex", tmp_path / "classes.dex")
    check = subprocess.run(["dexdump", "-c", str(dex)], capture_output=True, text=True, check=True)
    assert "Checksum verified" in check.stdout + check.stderr
    dump = subprocess.run(["dexdump", str(dex)], capture_output=True, text=True, check=True).stdout
    classes = re.findall(r"Class descriptor\s+:\s+'L([^;]+);'", dump)
    assert {"ai/edgellm/EdgeLLMNative", "ai/edgellm/demo/ChatActivity"} <= set(classes)
    natives_declared = []
    for block in dump.split("Class #")[1:]:
        cls = re.search(r"Class descriptor\s+:\s+'L([^;]+);'", block).group(1)
        for name, flags in re.findall(r"name\s+:\s+'([^']+)'\n\s+type\s+:\s+'[^']*'\n\s+access\s+:\s+0x([0-9a-f]+)",
                                      block):
            if int(flags, 16) & 0x0100:  # ACC_NATIVE
                natives_declared.append("Java_" + cls.replace("/", "_") + "_" + name)
    assert len(natives_declared) == 9
    lib = _apk_member(apk, "lib/arm64-v8a/libedgellm_jni.so", tmp_path / "libedgellm_jni.so")
    exported = elfinfo.read(lib).exports
    assert [n for n in natives_declared if n not in exported] == []


@pytest.mark.slow
@needs_tools
def test_native_libraries_are_arm64_and_need_only_shipped_or_ndk_libraries(apk, tmp_path):
    with zipfile.ZipFile(apk) as z:
        libs = [n for n in z.namelist() if n.startswith("lib/")]
    names = {Path(n).name for n in libs}
    assert names == {"libonnxruntime.so", "libonnxruntime-genai.so", "libmat.so", "libedgellm_jni.so"}
    for member in libs:
        info = elfinfo.read(_apk_member(apk, member, tmp_path / Path(member).name))
        assert info.machine == "aarch64", member
        missing = [n for n in info.needed if n not in names and n not in elfinfo.NDK_STABLE]
        assert missing == [], f"{member} needs {missing}"


@pytest.mark.slow
@needs_tools
def test_zip_layout_16k_libraries_and_uncompressed_model(apk, onnx_app, onnx_dir, tmp_path):
    layout = {e.name: e for e in ziptools.layout(apk)}
    for name, e in layout.items():
        if name.startswith("lib/"):
            assert not e.compressed and e.aligned(16384), name
        if name.startswith("assets/edgellm/model/") or name == "resources.arsc":
            assert not e.compressed and e.aligned(4), name
    assert ziptools.misaligned(apk) == []
    if shutil.which("zipalign"):  # Android's own checker agrees (-p: libraries on page boundaries)
        subprocess.run(["zipalign", "-c", "-p", "4", str(apk)], check=True, capture_output=True)
    shipped = json.loads(zipfile.ZipFile(apk).read("assets/edgellm/manifest.json"))
    for name, digest in shipped["model"]["files"].items():
        assert layout[f"assets/edgellm/model/{name}"].size == (onnx_dir / name).stat().st_size
        assert digest == natives.sha256_file(onnx_dir / name)
    # ELF segment alignment: ours and onnxruntime's are 16 KB; whatever is not was reported
    for name in ("libedgellm_jni.so", "libonnxruntime.so", "libonnxruntime-genai.so", "libmat.so"):
        info = elfinfo.read(_apk_member(apk, f"lib/arm64-v8a/{name}", tmp_path / name))
        warned = any(name in w and "16 KB" in w for w in onnx_app.warnings)
        assert info.page_ok() != warned, name
    assert elfinfo.read(tmp_path / "libedgellm_jni.so").page_ok()


@pytest.mark.slow
@needs_tools
def test_apk_size_and_figures(onnx_app):
    apk = onnx_app.apk
    assert apk.bytes == (onnx_app.out / APK_NAME).stat().st_size
    # stored libraries: onnxruntime (31 MB) + genai (5 MB) + libmat (4 MB, debug info stripped) + ours
    assert apk.bytes - apk.model_bytes < 45 << 20
    assert onnx_app.seconds < 120


# ---------------------------------------------------------------- the app's code on the host


@pytest.mark.slow
@needs_tools
def test_genai_folder_greedy_answer_equals_edgellm(onnx_dir):
    og = pytest.importorskip("onnxruntime_genai")
    prompt = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    want = _greedy_edgellm(onnx_dir, prompt, 32)
    model = og.Model(str(onnx_dir))
    ids = [int(i) for i in og.Tokenizer(model).encode(prompt)]
    with edgellm.load(onnx_dir, n_ctx=2048, disk_cache=False) as s:
        assert ids == s.tokenize(prompt)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 32, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        got = []
        while not gen.is_done() and len(got) < 32:
            gen.generate_next_token()
            got.append(int(gen.get_next_tokens()[0]))
        if len(got) == len(want) + 1:   # genai hands back the end-of-turn token too; edgellm stops before it
            assert s.backend.is_eog(got.pop()), got
    assert got == want[:len(got)] and len(got) >= 8


@pytest.mark.slow
@needs_tools
def test_jvm_runs_the_apk_dex_and_jni_glue_like_edgellm(apk, onnx_dir, tmp_path):
    """classes.dex from the APK -> JVM bytecode (enjarify); the JNI C compiled for x86-64 against the host
    onnxruntime-genai; a JVM drives EdgeLLMNative exactly as the app's Worker does."""
    pytest.importorskip("onnxruntime_genai")
    if shutil.which("enjarify") is None or shutil.which("javac") is None:
        pytest.skip("enjarify / javac missing (run .ci/setup.sh)")
    from edgellm.package import hostbuild

    dex = _apk_member(apk, "classes.dex", tmp_path / "classes.dex")
    env = {**os.environ, "PYTHON": "/usr/bin/python3"} if Path("/usr/bin/python3").exists() else None
    subprocess.run(["enjarify", "-f", str(dex), "-o", str(tmp_path / "app.jar")], check=True, env=env,
                   capture_output=True)
    lib = hostbuild.engine_library("genai", jni=True)
    libdir = tmp_path / "lib"
    libdir.mkdir()
    os.symlink(lib, libdir / "libedgellm_jni.so")
    os.symlink(hostbuild.pip_genai_dir() / "libonnxruntime.so", libdir / "libonnxruntime.so")
    manifest = json.loads(zipfile.ZipFile(apk).read("assets/edgellm/manifest.json"))
    model = tmp_path / manifest["model_dir"]
    with zipfile.ZipFile(apk) as z:
        for name in manifest["files"]:
            model.mkdir(exist_ok=True)
            (model / name).write_bytes(z.read(f"assets/edgellm/model/{name}"))
    chat_dir = tmp_path / "chat"
    chat_dir.mkdir()
    for key in ("system_text", "turn_prefix", "turn_suffix"):
        (chat_dir / key).write_text(manifest["chat"][key], encoding="utf-8")
    (chat_dir / "question").write_text(QUESTION, encoding="utf-8")
    driver = Path(__file__).parent / "fixtures" / "android" / "Drive.java"
    subprocess.run(["javac", "-cp", str(tmp_path / "app.jar"), "-d", str(tmp_path / "classes"), str(driver)],
                   check=True, capture_output=True)
    run = subprocess.run(["java", "-Xverify:all", f"-Djava.library.path={libdir}", "-cp",
                          f"{tmp_path / 'app.jar'}:{tmp_path / 'classes'}", "Drive", str(model),
                          str(chat_dir), "48"], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)
    got = [int(t) for t in lines["tokens"].split(",") if t]
    chat = manifest["chat"]
    want = _greedy_edgellm(onnx_dir, chat["system_text"] + QUESTION + chat["turn_suffix"], 48)
    assert got == want[:len(got)] and len(got) >= 5   # "The capital of France is Paris."
    assert lines["info"].startswith("onnxruntime-genai")
    # second turn and reset go through the same bytecode
    assert int(lines["turn2_tokens"]) > 0 and lines["reset_equal"] == "true"


def _pieces(manifest_chat: dict):
    from edgellm.package.manifest import ChatPieces

    return ChatPieces(**manifest_chat)


@pytest.mark.slow
@needs_tools
def test_genai_engine_turns_match_a_fresh_run(onnx_dir):
    """The C engine's multi-turn handling (rewind + re-append) leaves the cache a fresh run would have."""
    pytest.importorskip("onnxruntime_genai")
    from edgellm.package import hostbuild
    from edgellm.package.engine import Engine

    chat = chat_pieces(CHATML, "You are terse.")
    lib = hostbuild.engine_library("genai")
    with Engine(lib, onnx_dir, chat, n_ctx=1024, threads=2) as e:
        first = e.ask("Name a red fruit.", 24)
        second = e.ask("And a yellow one?", 24)
        e.reset()
        again = e.ask("Name a red fruit.", 24)
    assert again.tokens == first.tokens
    history = (chat.system_text + "Name a red fruit." + chat.turn_suffix + first.text + chat.turn_prefix
               + "And a yellow one?" + chat.turn_suffix)
    want = _greedy_edgellm(onnx_dir, history, 24)
    assert second.tokens == want[:len(second.tokens)] and second.tokens


# ---------------------------------------------------------------- llama.cpp path: the shipped state


@pytest.mark.slow
def test_llama_shipped_state_answers_like_cold_and_cuts_ttft(llama_app):
    from edgellm.package.state import fingerprint, measure_ttft
    from edgellm.runtimes.kv_cache import read_state_file

    m = llama_app.manifest
    state = m["system_state"]
    model_dir = llama_app.out / "app/src/main/assets/edgellm/model"
    gguf, kv = model_dir / m["files"][0], model_dir / state["file"]
    assert natives.sha256_file(kv) == state["sha256"] and state["llama_cpp"] == "b10679-50f068fff"
    saved = read_state_file(kv, fingerprint(state["model_sha256"]))  # checksums verified
    assert saved.tokens == state["tokens"] and state["n_tokens"] > 60
    r = measure_ttft(gguf, _pieces(m["chat"]), kv, state["tokens"], QUESTION, runs=1)
    assert r["restored"] and r["same_answer"]
    # CPU time: the work; wall time on a shared 2-core machine swings with whatever else runs
    assert r["state_over_cold_cpu"] <= 0.25, r


@pytest.mark.slow
def test_llama_refused_or_tampered_state_falls_back_to_evaluating(llama_app, tmp_path):
    from edgellm.package import hostbuild
    from edgellm.package.engine import STATE_REFUSED, Engine

    m = llama_app.manifest
    state = m["system_state"]
    model_dir = llama_app.out / "app/src/main/assets/edgellm/model"
    gguf = model_dir / m["files"][0]
    chat, lib = _pieces(m["chat"]), hostbuild.engine_library("llama")
    with Engine(lib, gguf, chat, n_ctx=2048, threads=1) as e:
        want = e.ask(QUESTION, 16).tokens
    good = (model_dir / state["file"]).read_bytes()
    cases = {"truncated": good[: len(good) // 2], "not a state": b"hello" * 10,
             "payload zeroed": good[: len(good) - 4096] + bytes(4096)}
    for label, data in cases.items():
        bad = tmp_path / f"{label}.kv"
        bad.write_bytes(data)
        with Engine(lib, gguf, chat, n_ctx=2048, threads=1, state_path=bad, state_tokens=state["tokens"]) as e:
            if label != "payload zeroed":  # zeroed KV bytes load (llama.cpp cannot tell): the app's sha256 check does
                assert e.state_status == STATE_REFUSED, label
                assert e.ask(QUESTION, 16).tokens == want, label
    wrong_tokens = [*state["tokens"][:-1], state["tokens"][-1] + 1]
    with Engine(lib, gguf, chat, n_ctx=2048, threads=1, state_path=model_dir / state["file"],
                state_tokens=wrong_tokens) as e:
        assert e.state_status == STATE_REFUSED and "differ" in e.info


@pytest.mark.slow
def test_llama_project_builds_llama_cpp_from_the_same_source(llama_app):
    cpp = llama_app.out / "edgellm/src/main/cpp"
    assert (cpp / "engine_llama.c").is_file() and not (cpp / "engine_genai.c").exists()
    assert (cpp / "llama.cpp/include/llama.h").read_bytes() == (natives.llama_source() / "include/llama.h").read_bytes()
    cmake = (cpp / "CMakeLists.txt").read_text()
    assert "add_subdirectory(llama.cpp)" in cmake and 'EL_LLAMA_BUILD="b10679-50f068fff"' in cmake
    rt = llama_app.manifest["runtime"]
    assert rt["flash_attn"] is True and rt["type_k"] == rt["type_v"] == "f16" and rt["name"] == "llama.cpp"


# ---------------------------------------------------------------- the Gradle project's files


def _kotlin_parser():
    ts = pytest.importorskip("tree_sitter")
    tk = pytest.importorskip("tree_sitter_kotlin")
    return ts.Parser(ts.Language(tk.language()))


def _project_checks(root: Path, backend: str) -> None:
    parser = _kotlin_parser()
    for path in [*root.rglob("*.kt"), *root.rglob("*.kts")]:
        tree = parser.parse(path.read_bytes())
        assert not tree.root_node.has_error, f"{path.relative_to(root)} does not parse as Kotlin"
    import xml.etree.ElementTree as ET

    for path in root.rglob("*.xml"):
        ET.parse(path)
    settings = (root / "settings.gradle.kts").read_text()
    assert 'include(":app", ":edgellm")' in settings
    # the Kotlin natives are the C bridge's exports
    kt = (root / "edgellm/src/main/java/ai/edgellm/EdgeLLMNative.kt").read_text()
    declared = set(re.findall(r"external fun (\w+)\(", kt))
    bridge = (root / "edgellm/src/main/cpp/jni_bridge.c").read_text()
    assert declared == set(re.findall(r"EL_CLASS\((\w+)\)\(", bridge)) and len(declared) == 9
    # the app's R.id / R.string references exist in its resources
    activity = (root / "app/src/main/java/ai/edgellm/demo/ChatActivity.kt").read_text()
    layout = (root / "app/src/main/res/layout/activity_chat.xml").read_text()
    strings = (root / "app/src/main/res/values/strings.xml").read_text()
    for ident in set(re.findall(r"R\.id\.(\w+)", activity)):
        assert f'@+id/{ident}"' in layout, ident
    for name in set(re.findall(r"R\.string\.(\w+)", activity)):
        assert f'name="{name}"' in strings, name
    # CMake compiles files that are there
    cmake = (root / "edgellm/src/main/cpp/CMakeLists.txt").read_text()
    for src in re.findall(r"\b(\w+\.c)\b", cmake):
        assert (root / "edgellm/src/main/cpp" / src).is_file(), src
    lib = (root / "edgellm/build.gradle.kts").read_text()
    if backend == "onnx":
        for artifact, version in (("onnxruntime-android", natives.ORT_VERSION),
                                  ("onnxruntime-genai-android", natives.GENAI_VERSION)):
            assert f'"com.microsoft.onnxruntime:{artifact}:{version}"' in lib
            aar = root / "maven-local/com/microsoft/onnxruntime" / artifact / version / f"{artifact}-{version}.aar"
            assert natives.sha256_file(aar) in (root / "maven-local/README.md").read_text()
    manifest = json.loads((root / "app/src/main/assets/edgellm/manifest.json").read_text())
    assert EdgeLLMKeys <= set(manifest) and set(manifest["chat"]) >= {"system_text", "turn_prefix", "turn_suffix"}
    assert "adb install" in (root / "README.md").read_text() or backend != "onnx"


EdgeLLMKeys = {"format", "model", "model_dir", "files", "runtime", "chat", "system_state", "plan", "memory"}


@pytest.mark.slow
def test_gradle_project_onnx_parses_and_names_match(onnx_app):
    _project_checks(onnx_app.out, "onnx")
    assert onnx_app.manifest["runtime"]["provider"] == "xnnpack"


@pytest.mark.slow
def test_gradle_project_llama_parses_and_names_match(llama_app):
    _project_checks(llama_app.out, "llama.cpp")


def test_template_kotlin_files_parse():
    from edgellm.package.apk import template_dir

    parser = _kotlin_parser()
    for path in (template_dir() / "gradle").rglob("*.kt"):
        assert not parser.parse(path.read_bytes()).root_node.has_error, path.name


# ---------------------------------------------------------------- pieces and bad input


def test_chat_pieces_concatenate_to_the_templates_rendering():
    from edgellm import chat_template

    p = chat_pieces(CHATML, "Be brief.")
    whole = chat_template.render(CHATML, [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                          {"role": "user", "content": "Bye"}])
    assert p.system_text + "Hi" + p.turn_suffix + "Yo" + p.turn_prefix + "Bye" + p.turn_suffix == whole
    assert p.turn_prefix == "<|im_end|>\n<|im_start|>user\n"


def test_chat_pieces_refuse_a_template_that_repeats_messages():
    from edgellm.errors import TemplateError

    twice = "{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError):
        chat_pieces(twice, None)


def test_aligned_zip_writer_and_checker(tmp_path):
    lib, data = tmp_path / "a.so", tmp_path / "b.bin"
    lib.write_bytes(os.urandom(5000))
    data.write_bytes(os.urandom(3001))
    apk = tmp_path / "t.zip"
    ziptools.write_aligned_zip(apk, [ziptools.Entry("x.txt", b"hello" * 99, True),
                                     ziptools.Entry("lib/arm64-v8a/a.so", lib, False),
                                     ziptools.Entry("assets/b.bin", data, False),
                                     ziptools.Entry("lib/arm64-v8a/c.so", lib, False)])
    assert ziptools.misaligned(apk) == []
    with zipfile.ZipFile(apk) as z:
        assert z.read("lib/arm64-v8a/c.so") == lib.read_bytes() and z.testzip() is None
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("pad.txt", b"x" * 7, compress_type=zipfile.ZIP_STORED)
        z.write(lib, "lib/arm64-v8a/a.so", compress_type=zipfile.ZIP_STORED)
    assert any("a.so" in m and "needs 16384" in m for m in ziptools.misaligned(plain))


def test_refuses_existing_output(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="--force"):
        package_android("smollm2-135m", tmp_path / "out")


def test_refuses_a_format_the_backend_cannot_run(tmp_path):
    with pytest.raises(UnsupportedModelError, match="convert it first"):
        package_android("smollm2-135m", tmp_path / "out", backend="onnx")
    with pytest.raises(UsageError, match="--apk"):
        package_android("smollm2-135m", tmp_path / "out", apk=True)
    assert not (tmp_path / "out").exists()


def test_refuses_a_model_too_large_for_the_phone_class(tmp_path, monkeypatch):
    monkeypatch.setitem(memplan.PHONES, "tiny-phone", memplan.Board("tiny-phone", 512 << 20, 96 << 20, "a53", 4, ()))
    with pytest.raises(InsufficientMemoryError, match="tiny-phone"):
        package_android("smollm2-135m", tmp_path / "out", phone="tiny-phone")
    with pytest.raises(UsageError, match="phone class"):
        package_android("smollm2-135m", tmp_path / "out", phone="nokia-3310")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_refuses_a_system_prompt_longer_than_the_context(tmp_path):
    with pytest.raises(ContextOverflowError, match="system prompt"):
        package_android("smollm2-135m", tmp_path / "out", system=SYSTEM * 4, n_ctx=128)
    assert not (tmp_path / "out").exists()


def test_refuses_bad_abi_and_application_id(tmp_path):
    with pytest.raises(UsageError, match="ABI"):
        package_android("smollm2-135m", tmp_path / "out", abis=("mips",))
    with pytest.raises(UsageError, match="application id"):
        package_android("smollm2-135m", tmp_path / "out", package="not an id")


def test_missing_tool_names_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingToolError, match="apt-get install aapt"):
        tools.need("aapt2")
    monkeypatch.setenv("EDGELLM_NATIVES_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MissingToolError, match="apt-get install npm"):
        natives.fetch(natives.GENAI)


@pytest.mark.slow
@needs_tools
def test_a_tarball_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("EDGELLM_NATIVES_CACHE", str(tmp_path / "cache"))
    forged = dataclasses.replace(natives.GENAI, sha256="0" * 64)
    with pytest.raises(PackagingError, match="not the pinned"):
        natives.fetch(forged)
    assert not any((tmp_path / "cache").glob("*/.edgellm-verified"))


def test_cli_package_help_and_exit_codes(tmp_path):
    from click.testing import CliRunner

    from edgellm.cli import cli, main

    help_text = CliRunner().invoke(cli, ["package", "--help"]).output
    assert "android" in help_text and "ios" in help_text
    assert "--apk" in CliRunner().invoke(cli, ["package", "android", "--help"]).output
    (tmp_path / "out").mkdir()
    for argv, code in ((["package", "android", "smollm2-135m", "-o", str(tmp_path / "out")], 2),
                       (["package", "android", "smollm2-135m", "-o", str(tmp_path / "new"), "--backend", "onnx"], 5),
                       (["package", "ios", "smollm2-135m", "-o", str(tmp_path / "new"), "--phone", "tiny"], 2)):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == code, argv


# the Android framework's class hierarchy (API 24+), no behaviour: what a JVM verifier needs to check the
# app's translated classes (values passed where their declared types say, register types at merges)
ANDROID_HIERARCHY = {
    "android.content.Context": "public abstract class Context {}",
    "android.app.Activity": "public class Activity extends android.content.Context {}",
    "android.os.Bundle": "public final class Bundle {}",
    "android.view.View": "public class View { public interface OnClickListener {} }",
    "android.view.ViewGroup": "public abstract class ViewGroup extends android.view.View {"
                              " public static class LayoutParams {} }",
    "android.widget.LinearLayout": "public class LinearLayout extends android.view.ViewGroup {"
                                   " public static class LayoutParams extends android.view.ViewGroup.LayoutParams {} }",
    "android.widget.ScrollView": "public class ScrollView extends android.view.ViewGroup {}",
    "android.widget.TextView": "public class TextView extends android.view.View {}",
    "android.widget.EditText": "public class EditText extends android.widget.TextView {}",
    "android.widget.Button": "public class Button extends android.widget.TextView {}",
    "android.text.Editable": "public interface Editable extends CharSequence {}",
    "android.content.res.AssetManager": "public final class AssetManager {}",
    "org.json.JSONObject": "public class JSONObject {}",
    "org.json.JSONArray": "public class JSONArray {}",
}


@pytest.mark.slow
@needs_tools
def test_apk_classes_pass_a_bytecode_verifier(apk, tmp_path):
    """ChatActivity, Worker and Ui (hand-written smali) translated to JVM bytecode and verified against the
    framework's class hierarchy: a register type error fails here instead of on a phone."""
    if shutil.which("enjarify") is None or shutil.which("javac") is None:
        pytest.skip("enjarify / javac missing (run .ci/setup.sh)")
    dex = _apk_member(apk, "classes.dex", tmp_path / "classes.dex")
    env = {**os.environ, "PYTHON": "/usr/bin/python3"} if Path("/usr/bin/python3").exists() else None
    subprocess.run(["enjarify", "-f", str(dex), "-o", str(tmp_path / "app.jar")], check=True, env=env,
                   capture_output=True)
    sources = []
    for qualified, body in ANDROID_HIERARCHY.items():
        pkg, _, name = qualified.rpartition(".")
        path = tmp_path / "stubs-src" / pkg.replace(".", "/") / f"{name}.java"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"package {pkg};\n{body}\n")
        sources.append(str(path))
    sources.append(str(Path(__file__).parent / "fixtures" / "android" / "Verify.java"))
    subprocess.run(["javac", "-d", str(tmp_path / "stubs"), *sources], check=True, capture_output=True)
    run = subprocess.run(["java", "-Xverify:all", "-cp", f"{tmp_path / 'app.jar'}:{tmp_path / 'stubs'}", "Verify",
                          str(tmp_path / "app.jar")], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "verified=3" in run.stdout


@pytest.mark.slow
def test_host_engine_and_llama_cpp_python_coexist_in_one_process(llama_app):
    """llama-cpp-python ships another llama.cpp under the same library names; the host engine links its llama.cpp
    statically with hidden symbols, so both run in one process, in either order, each with its own version."""
    import sys

    m = llama_app.manifest
    model_dir = llama_app.out / "app/src/main/assets/edgellm/model"
    script = f"""
import json, edgellm
from pathlib import Path
from edgellm.package import hostbuild
from edgellm.package.engine import Engine
from edgellm.package.manifest import ChatPieces
chat = ChatPieces(**json.loads({json.dumps(json.dumps(m["chat"]))}))
def engine():
    with Engine(hostbuild.engine_library("llama"), Path({str(model_dir / m["files"][0])!r}), chat, threads=1) as e:
        assert "b10679" in e.info, e.info
        return e.ask("Hi", 4).tokens
def python_runtime():
    with edgellm.load("smollm2-135m", n_ctx=256, disk_cache=False, sampler=edgellm.GREEDY) as s:
        return s.generate("Hi", max_tokens=4).tokens
a, b, c = engine(), python_runtime(), engine()
assert a == c and a and b, (a, b, c)
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
