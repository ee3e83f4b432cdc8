"""edgellm package: wrap a model into a mobile app project (Android Gradle project + APK, iOS Swift package)."""
from __future__ import annotations

from pathlib import Path

import click

from .output import emit_json, err, human_bytes, out, stage_progress


@click.group("package")
def command() -> None:
    """Package a model into a mobile app.

    \b
    edgellm package android MODEL -o DIR [--apk]   Gradle project (+ a signed APK, ONNX backend)
    edgellm package ios MODEL -o DIR               Swift package + SwiftUI demo app
    See docs/mobile.md for what each contains and what only a phone proves.
    """


def _options(f):
    for opt in reversed([
        click.argument("model", required=False),
        click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Directory to write."),
        click.option("--system", default=None, help="System prompt [default: the model template's own]."),
        click.option("--ctx", "n_ctx", type=int, default=2048, show_default=True, help="Context size on the phone."),
        click.option("--max-tokens", type=int, default=512, show_default=True, help="Longest answer."),
        click.option("--threads", type=int, default=None, help="Threads [default: the phone class's big cores]."),
        click.option("--app-name", default="edgellm chat", show_default=True),
        click.option("--force", is_flag=True, help="Replace the output directory if it exists."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]):
        f = opt(f)
    return f


def _report(result: dict, as_json: bool) -> None:
    if as_json:
        emit_json(result)
        return
    out.print(f"wrote {result['output']} ({result['backend']}, {result['files']} files, {result['seconds']} s)")
    m, rt = result["model"], result["runtime"]
    out.print(f"  model    {m['name']} ({m['format']}, {human_bytes(m['bytes'])}, sha256 {m['sha256'][:16]}…)")
    out.print(f"  runtime  {rt['name']} {rt['version']}, provider {rt['provider']}, {rt['threads']} threads, "
              f"ctx {rt['n_ctx']}, max {rt['max_tokens']} tokens")
    out.print(f"  memory   {result['memory']['message']}")
    state = result.get("system_state")
    if state:
        out.print(f"  state    {state['file']}: {state['n_tokens']} system-prompt tokens, "
                  f"{human_bytes(state['bytes'])}, llama.cpp {state['llama_cpp']}")
    apk = result.get("apk")
    if apk:
        out.print(f"  apk      {apk['path']}: {human_bytes(apk['bytes'])} = model + "
                  f"{human_bytes(apk['overhead_bytes'])}, {', '.join(apk['abis'])}, {apk['seconds']} s")
    for w in result.get("warnings") or []:
        err.print(f"warning: {w}")


@command.command("android")
@_options
@click.option("--backend", type=click.Choice(["onnx", "llama.cpp"]), default=None,
              help="Runtime in the app [default: from the model: ONNX directory -> onnx, GGUF -> llama.cpp].")
@click.option("--apk", is_flag=True, help="Also build a signed debug APK offline (onnx backend).")
@click.option("--abi", "abis", multiple=True, default=("arm64-v8a",), show_default=True,
              help="Android ABI (repeatable): arm64-v8a, x86_64 (emulators).")
@click.option("--phone", default="android-4gb", show_default=True,
              help="Phone class the model must fit: android-3gb, android-4gb, android-6gb, android-8gb.")
@click.option("--package-id", default="ai.edgellm.demo", show_default=True, help="Android application id.")
@click.option("--compress-libs", is_flag=True,
              help="Store native libraries compressed (smaller APK, extracted at install) instead of 16 KB-aligned.")
def android(model, output, system, n_ctx, max_tokens, threads, app_name, force, as_json, backend, apk, abis,
            phone, package_id, compress_libs) -> None:
    """Write an Android Studio project around MODEL, and with --apk a signed debug APK.

    \b
    Examples:
      edgellm convert smollm2-135m --format onnx -o smol-onnx
      edgellm package android smol-onnx -o smol-app --apk --system "You are a museum guide."
      adb install -r smol-app/edgellm-chat-debug.apk
      edgellm package android smollm2-135m -o smol-llama     # llama.cpp + shipped system-prompt state
    """
    from ..package import package_android

    with stage_progress(err.is_terminal and not as_json) as report:
        result = package_android(model, output, system=system, backend=backend, apk=apk, force=force,
                                 abis=tuple(abis), phone=phone, n_ctx=n_ctx, max_tokens=max_tokens,
                                 threads=threads, app_name=app_name, package=package_id,
                                 compress_libs=compress_libs, progress=report)
    _report(result.to_dict(), as_json)


@command.command("ios")
@_options
@click.option("--backend", type=click.Choice(["coreml", "llama.cpp"]), default=None,
              help="Runtime in the app [default: from the model: .mlpackage -> coreml, GGUF -> llama.cpp].")
@click.option("--phone", default="iphone-6gb", show_default=True,
              help="Phone class the model must fit: iphone-4gb, iphone-6gb, iphone-8gb.")
@click.option("--bundle-id", default="ai.edgellm.demo", show_default=True, help="The demo app's bundle id.")
def ios(model, output, system, n_ctx, max_tokens, threads, app_name, force, as_json, backend, phone,
        bundle_id) -> None:
    """Write a Swift package (EdgeLLM library + model resources) and a SwiftUI demo app around MODEL.

    \b
    Example:
      edgellm package ios smollm2-135m -o smol-ios --system "You are a museum guide."
    Open smol-ios/EdgeLLMDemo/EdgeLLMDemo.xcodeproj in Xcode 16 on a Mac and run on an iPhone.
    """
    from ..package import package_ios

    with stage_progress(err.is_terminal and not as_json) as report:
        result = package_ios(model, output, system=system, backend=backend, force=force, phone=phone,
                             n_ctx=n_ctx, max_tokens=max_tokens, threads=threads, app_name=app_name,
                             bundle_id=bundle_id, progress=report)
    _report(result.to_dict(), as_json)
