"""edgellm package ios: the Swift package and the demo app, checked without a Swift toolchain.

No Swift compiler exists on Linux here, so what Xcode would check first is checked directly: the Swift
parses (tree-sitter), Package.swift names what is on disk, every plist parses, the xcframework's
Mach-O slices are what its plist claims, it exports every llama.cpp symbol the C engine calls (the
engine compiled for arm64 iOS), the Swift calls only C functions the engine declares, the Xcode project
round-trips through pbxproj with nothing dangling, and the shipped state answers like a cold run on a
host build of the same llama.cpp. Compiling and running need a Mac (docs/mobile.md).
"""
from __future__ import annotations

import plistlib
import re
import shutil
from pathlib import Path

import pytest
from model_fixtures import COREML_CTX

from edgellm import memplan
from edgellm.errors import InsufficientMemoryError, UnsupportedModelError, UsageError
from edgellm.package import natives
from edgellm.package.ios import package_ios

SYSTEM = ("You are the guide of a small science museum. Visitors ask about the exhibits: the Foucault pendulum, "
          "the Tesla coil, the meteorite collection and the planetarium. Answer in one or two friendly sentences, "
          "say when you do not know, and never invent opening hours or ticket prices; point visitors to the front "
          "desk for those. Keep every answer suitable for children.")
needs_llvm = pytest.mark.skipif(any(shutil.which(t) is None for t in ("clang-14", "llvm-nm-14", "llvm-objdump-14")),
                                reason="clang-14 / llvm-14 missing (run .ci/setup.sh)")


@pytest.fixture(scope="module")
def ios_app(module_tmp):
    return package_ios("smollm2-135m", module_tmp / "app", system=SYSTEM)


def _swift_parser():
    ts = pytest.importorskip("tree_sitter")
    sw = pytest.importorskip("tree_sitter_swift")
    return ts.Parser(ts.Language(sw.language()))


@pytest.mark.slow
def test_swift_sources_parse(ios_app):
    parser = _swift_parser()
    sources = list(ios_app.out.rglob("*.swift"))
    assert len(sources) == 5
    for path in sources:
        assert not parser.parse(path.read_bytes()).root_node.has_error, path.name


def test_template_swift_parses():
    from edgellm.package.ios import template_dir

    parser = _swift_parser()
    for path in template_dir().rglob("*.swift"):
        assert not parser.parse(path.read_bytes()).root_node.has_error, path.name


@pytest.mark.slow
def test_package_swift_names_what_is_on_disk(ios_app):
    pkg = ios_app.out / "EdgeLLM"
    text = (pkg / "Package.swift").read_text()
    assert text.startswith("// swift-tools-version:5.9")
    assert '.library(name: "EdgeLLM", targets: ["EdgeLLM"])' in text
    assert 'platforms: [.iOS("16.4")]' in text
    binary = re.search(r'\.binaryTarget\(name: "llama", path: "([^"]+)"\)', text).group(1)
    assert (pkg / binary / "Info.plist").is_file()
    for name, path in re.findall(r'name: "(\w+)",\s*dependencies: \[[^\]]*\],\s*path: "([^"]+)"', text):
        assert (pkg / path).is_dir(), name
    declared = set(re.findall(r'\.copy\("Resources/([^"]+)"\)', text))
    on_disk = {p.name for p in (pkg / "Sources/EdgeLLM/Resources").iterdir()}
    assert declared == on_disk == {"manifest.json", "system.kv", "smollm2-135m.gguf"}
    assert (pkg / "Sources/EdgeLLMCore/engine_llama.c").read_bytes() == \
        (Path(natives.__file__).parent / "native/engine_llama.c").read_bytes()
    assert f'b{natives.LLAMA_CPP_BUILD}-{natives.LLAMA_CPP_COMMIT}' in text
    # the Swift reads the resources by the names they have
    swift = (pkg / "Sources/EdgeLLM/EdgeLLM.swift").read_text() + (pkg / "Sources/EdgeLLM/Manifest.swift").read_text()
    assert 'forResource: "manifest", withExtension: "json"' in swift and "import EdgeLLMCore" in swift


@pytest.mark.slow
def test_swift_calls_only_functions_and_fields_the_c_engine_declares(ios_app):
    header = (ios_app.out / "EdgeLLM/Sources/EdgeLLMCore/include/edgellm_engine.h").read_text()
    declared = set(re.findall(r"\b(el_\w+)\(", header))
    struct = header[header.index("typedef struct el_options"):header.index("} el_options;")]
    fields = set(re.findall(r"\b(\w+);", struct))
    swift = (ios_app.out / "EdgeLLM/Sources/EdgeLLM/EdgeLLM.swift").read_text()
    called = set(re.findall(r"\b(el_\w+)\(", swift)) - {"el_options"}
    assert called and called <= declared, called - declared
    assert set(re.findall(r"options\.(\w+) =", swift)) <= fields
    assert {"el_open", "el_begin", "el_next", "el_reset", "el_close"} <= called


@pytest.mark.slow
def test_every_plist_is_valid(ios_app):
    plists = [p for p in ios_app.out.rglob("*.plist")]
    assert len(plists) >= 4  # the xcframework's, its two frameworks', the demo app's
    for p in plists:
        with open(p, "rb") as f:
            plistlib.load(f)
    info = plistlib.loads((ios_app.out / "EdgeLLMDemo/EdgeLLMDemo/Info.plist").read_bytes())
    assert info["CFBundleIdentifier"] == "$(PRODUCT_BUNDLE_IDENTIFIER)" and info["CFBundlePackageType"] == "APPL"
    assert info["CFBundleDisplayName"] == "edgellm chat"


@pytest.mark.slow
@needs_llvm
def test_xcframework_slices_and_exports_cover_the_engine(ios_app, tmp_path):
    from edgellm.package import macho

    xcf = ios_app.out / "EdgeLLM/Frameworks/llama.xcframework"
    found = {s.identifier: s for s in macho.slices(xcf)}
    device = found["ios-arm64"]
    assert device.archs == ("arm64",) and device.platform == "ios" and device.minos == "16.4"
    sim = found["ios-arm64_x86_64-simulator"]
    assert sim.archs == ("arm64", "x86_64") and sim.platform == "iossimulator"
    needed = macho.engine_imports(xcf / "ios-arm64", tmp_path)
    assert {"llama_decode", "llama_state_seq_set_data", "llama_tokenize"} <= needed and len(needed) > 20
    assert needed <= device.exports and needed <= sim.exports
    assert macho.check_llama_xcframework(xcf, tmp_path / "check") == []
    assert ios_app.warnings == []


@pytest.mark.slow
@needs_llvm
def test_xcframework_check_catches_a_missing_symbol(ios_app, tmp_path, monkeypatch):
    from edgellm.package import macho

    real = macho._exports
    monkeypatch.setattr(macho, "_exports", lambda b: real(b) - {"llama_state_seq_set_data"})
    problems = macho.check_llama_xcframework(ios_app.out / "EdgeLLM/Frameworks/llama.xcframework", tmp_path)
    assert len(problems) == 2 and all("llama_state_seq_set_data" in p for p in problems)


@pytest.mark.slow
def test_pbxproj_round_trips_with_nothing_dangling(ios_app, tmp_path):
    from pbxproj import XcodeProject

    path = ios_app.out / "EdgeLLMDemo/EdgeLLMDemo.xcodeproj/project.pbxproj"
    text = path.read_text()
    project = XcodeProject.load(str(path))
    copy = tmp_path / "project.pbxproj"
    project.save(str(copy))
    again = XcodeProject.load(str(copy))
    assert str(again.objects.get_keys()) == str(project.objects.get_keys())
    assert copy.read_text() == text  # saving an unchanged project changes nothing
    ids = set(re.findall(r"^\t\t([0-9A-F]{24}) ", text, re.M))
    referenced = set(re.findall(r"\b([0-9A-F]{24})\b", text))
    assert referenced <= ids, referenced - ids
    demo = ios_app.out / "EdgeLLMDemo/EdgeLLMDemo"
    sources = project.get_object("E0000000000000000000A001")
    compiled = {str(project.get_object(project.get_object(b).fileRef).path) for b in sources.files}
    assert compiled == {f"EdgeLLMDemo/{p.name}" for p in demo.glob("*.swift")}
    for ref in project.objects.get_objects_in_section("PBXFileReference"):
        if getattr(ref, "sourceTree", "") == "<group>":
            found = list((ios_app.out / "EdgeLLMDemo").rglob(Path(str(ref.path)).name))
            assert found, ref.path
    local = project.objects.get_objects_in_section("XCLocalSwiftPackageReference")[0]
    assert (path.parent.parent / str(local.relativePath) / "Package.swift").is_file()
    product = project.objects.get_objects_in_section("XCSwiftPackageProductDependency")[0]
    assert str(product.productName) == "EdgeLLM"
    frameworks = project.get_object("E0000000000000000000A002")
    assert any(getattr(project.get_object(b), "productRef", None) == product.get_id() for b in frameworks.files)


@pytest.mark.slow
def test_ios_shipped_state_answers_like_a_cold_run(ios_app):
    from edgellm.package import hostbuild
    from edgellm.package.engine import STATE_RESTORED, Engine
    from edgellm.package.manifest import ChatPieces

    res = ios_app.out / "EdgeLLM/Sources/EdgeLLM/Resources"
    import json

    m = json.loads((res / "manifest.json").read_text())
    state = m["system_state"]
    assert natives.sha256_file(res / state["file"]) == state["sha256"]
    assert m["runtime"]["provider"] == "metal" and m["runtime"]["flash_attn"] is True
    chat, lib = ChatPieces(**m["chat"]), hostbuild.engine_library("llama")
    answers = {}
    for label, kw in (("cold", {}), ("state", {"state_path": res / state["file"], "state_tokens": state["tokens"]})):
        with Engine(lib, res / m["files"][0], chat, n_ctx=2048, threads=1, **kw) as e:
            if label == "state":
                assert e.state_status == STATE_RESTORED
            answers[label] = e.ask("Where can I see the meteorites?", 24).tokens
    assert answers["state"] == answers["cold"] and answers["cold"]


# ---------------------------------------------------------------- bad input


def test_refuses_existing_output_and_bad_bundle_id(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="--force"):
        package_ios("smollm2-135m", tmp_path / "out")
    with pytest.raises(UsageError, match="bundle identifier"):
        package_ios("smollm2-135m", tmp_path / "new", bundle_id="no spaces allowed")


def test_refuses_a_backend_or_format_ios_cannot_run(tmp_path):
    with pytest.raises(UsageError, match="not available for ios"):
        package_ios("smollm2-135m", tmp_path / "out", backend="onnx")
    with pytest.raises(UnsupportedModelError, match="convert it first"):
        package_ios("smollm2-135m", tmp_path / "out", backend="coreml")
    assert not (tmp_path / "out").exists()


def test_refuses_a_model_too_large_for_the_phone_class(tmp_path, monkeypatch):
    monkeypatch.setitem(memplan.PHONES, "tiny-iphone", memplan.Board("tiny-iphone", 1 << 30, 64 << 20, "a9", 2, ()))
    with pytest.raises(InsufficientMemoryError, match="tiny-iphone"):
        package_ios("smollm2-135m", tmp_path / "out", phone="tiny-iphone")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- Core ML path


@pytest.fixture(scope="module")
def coreml_app(coreml_int4, module_tmp):
    """The iOS app around the int4 package `edgellm convert --format coreml` makes (shared with test_coreml)."""
    return package_ios(Path(coreml_int4.output), module_tmp / "coreml-app")


@pytest.mark.slow
def test_coreml_package_swift_and_resources(coreml_app):
    pkg = coreml_app.out / "EdgeLLM"
    text = (pkg / "Package.swift").read_text()
    assert 'platforms: [.iOS("18.0")]' in text and "swift-transformers" in text and ".binaryTarget" not in text
    assert '.process("Resources/model.mlpackage")' in text
    declared = set(re.findall(r'\.(?:copy|process)\("Resources/([^"]+)"\)', text))
    assert declared == {p.name for p in (pkg / "Sources/EdgeLLM/Resources").iterdir()} == {
        "model.mlpackage", "config.json", "tokenizer.json", "tokenizer_config.json", "manifest.json"}
    swift = (pkg / "Sources/EdgeLLM/EdgeLLM.swift").read_text()
    for name in ("inputIds", "causalMask", "logits", "makeState", "AutoTokenizer"):
        assert name in swift, name
    parser = _swift_parser()
    for path in coreml_app.out.rglob("*.swift"):
        assert not parser.parse(path.read_bytes()).root_node.has_error, path.name


@pytest.mark.slow
def test_bundled_mlpackage_passes_the_core_ml_checks_and_answers(coreml_app):
    """From inside the Swift package: the exporter's structure checks, swift-transformers' contract, the
    manifest's digest, and the package run by edgellm's MIL interpreter through the app's chat pieces."""
    import json

    from edgellm.package.coreml import check_contract
    from edgellm.package.manifest import file_digests
    from edgellm.runtime_coreml import coreml_facts, load_coreml

    res = coreml_app.out / "EdgeLLM/Sources/EdgeLLM/Resources"
    bundled = res / "model.mlpackage"
    m = json.loads((res / "manifest.json").read_text())
    assert file_digests([bundled])["model.mlpackage"] == m["model"]["files"]["model.mlpackage"]
    _, facts = coreml_facts(bundled)
    io = check_contract(bundled)
    assert io["states"]["keyCache"]["shape"][3] == m["runtime"]["n_ctx"] == facts["context_length"]
    assert set(m["stop_ids"]) == set(facts["eog_ids"])
    chat = m["chat"]
    prompt = chat["system_text"] + "What is the capital of France?" + chat["turn_suffix"]
    import edgellm
    from edgellm.texts import heldout_text

    with load_coreml(bundled, device="interpreter", n_ctx=COREML_CTX,
                     session_kw={"disk_cache": False, "sampler": edgellm.GREEDY}) as s:
        answer = s.generate(prompt, max_tokens=12)
        # greedy (the default sampler draws at temperature 0.7: two CI runs sampled 'L'Étoque …' here); the 4-bit
        # package's first token is 'The' by 0.4 nats over 'L', then ' Paris' at p = 0.95
        assert "Paris" in answer.text, answer.text

        with edgellm.load("smollm2-135m", n_ctx=512, disk_cache=False) as ref:
            ids = ref.tokenize(heldout_text()[:1500])[:96]
            want = ref.backend.eval_all_logits(ids).argmax(-1)
        got = s.backend.eval_all_logits(ids).argmax(-1)
    # two different 4-bit roundings of the same weights (GPTQ int4 here, llama.cpp's Q4_1 there) mostly agree;
    # the exporter's own f16/int4 parity tests are tests/test_coreml.py's
    assert (got == want).mean() > 0.6


def test_coreml_bad_input(tmp_path):
    bogus = tmp_path / "x.mlpackage"
    bogus.mkdir()
    (bogus / "Manifest.json").write_text("{}")
    from edgellm.errors import EdgeLLMError

    with pytest.raises(EdgeLLMError):
        package_ios(bogus, tmp_path / "out")
    assert not (tmp_path / "out").exists()
