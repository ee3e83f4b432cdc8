"""What both packagers do first: resolve the model, check it suits the backend and the phone class,
render the chat template, plan the runtime, compute the shipped state, and write the app manifest.

Every refusal happens here, before any output is written: a format the backend cannot run, a model
too large for the phone class, a system prompt longer than the context.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import memplan, store
from ..errors import ContextOverflowError, InsufficientMemoryError, UnsupportedModelError, UsageError
from ..plan import RUNTIME_OVERHEAD_BYTES, Artifact, choose
from . import manifest as manifests
from . import natives
from .parts import Source, count_tokens, phone_profile

Progress = Callable[[str, int, int], None]
ONNX_FILES = ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json")
FORMAT_OF = {"onnx": "onnx", "llama.cpp": "gguf", "coreml": "coreml"}
BACKEND_OF = {"onnx": "onnx", "gguf": "llama.cpp", "coreml": "coreml"}
STATE_FILE = "system.kv"


def prepare(model: str | os.PathLike | None, backend: str | None, *, system: str | None, target: str,
            phone: str, n_ctx: int, max_tokens: int, threads: int | None,
            progress: Progress | None = None) -> Source:
    ref = store.resolve(model)
    kind = ref.kind
    backends = ("onnx", "llama.cpp") if target == "android" else ("coreml", "llama.cpp")
    chosen = (backend or BACKEND_OF.get(kind, "")).lower()
    if not chosen:
        fmt = "onnx" if target == "android" else "coreml"
        raise UnsupportedModelError(f"{ref.path} is a {kind} model: convert it first (edgellm convert MODEL "
                                    f"--format {fmt}, or to GGUF for llama.cpp)")
    if chosen not in backends:
        raise UsageError(f"--backend {backend!r} is not available for {target}: choose {' or '.join(backends)}")
    if FORMAT_OF[chosen] != kind:
        hint = {"onnx": "edgellm convert MODEL --format onnx -o DIR",
                "llama.cpp": "edgellm convert MODEL -o model.gguf",
                "coreml": "edgellm convert MODEL --format coreml -o model.mlpackage"}[chosen]
        raise UnsupportedModelError(f"the {chosen} backend runs a {FORMAT_OF[chosen]} model, and {ref.path} is "
                                    f"{kind}: convert it first ({hint})")
    if n_ctx < 64 or max_tokens < 1:
        raise UsageError("--ctx must be at least 64 tokens and --max-tokens at least 1")
    board = memplan.phone(phone)
    staging = tempfile.TemporaryDirectory(prefix="edgellm-package-")
    work = Path(staging.name)
    warnings: list[str] = []
    if chosen == "onnx":
        files, facts, template, specials = _onnx_files(ref.path, work)
        name = facts.get("name") or ref.path.name
        ctx = min(n_ctx, int(facts["context_length"]))
        from ..runtime_onnx import kv_bytes

        weights = sum(p.stat().st_size for p in files if p.name.startswith("model.onnx"))
        need = weights + kv_bytes(facts, ctx) + RUNTIME_OVERHEAD_BYTES
        artifact = Artifact("onnx", weights, str(facts.get("quant")), facts.get("flavour") or "fused")
    elif chosen == "llama.cpp":
        from ..gguf_check import validate_gguf

        info = validate_gguf(ref.path)
        files = [ref.path]
        name = str(info.metadata.get("general.name") or ref.path.stem)
        template, specials = _gguf_template(ref.path)
        trained = info.hparams().get("context_length") or n_ctx
        ctx = min(n_ctx, int(trained))
        est = memplan.estimate(info, ctx, "f16", flash_attn=True, state_cache_bytes=0)
        need = est.total_bytes
        artifact = Artifact("gguf", info.file_size, info.file_type_name)
    else:
        from .coreml import coreml_source  # the Core ML path (iOS)

        return coreml_source(ref, system=system, phone=board, n_ctx=n_ctx, max_tokens=max_tokens,
                             threads=threads, staging=staging, progress=progress)
    fit = memplan.FitReport(board.name, board.usable_bytes, need, need <= board.usable_bytes,
                            board.usable_bytes - need)
    if not fit.fits:
        raise InsufficientMemoryError(f"{name} at ctx {ctx} needs about {need / 2**20:.0f} MiB but a {board.name} "
                                      f"phone leaves an app about {board.usable_bytes / 2**20:.0f} MiB: use a smaller "
                                      "model or quant, or a shorter --ctx")
    chat = manifests.chat_pieces(template, system, **specials)
    plan = choose(phone_profile(board, target), artifact, threads=threads, n_ctx=ctx, memory_bytes=need)
    state_file, state = None, None
    if chosen == "llama.cpp":
        from .state import shipped_state

        state_file = work / STATE_FILE
        state = shipped_state(ref.path, chat, state_file, n_ctx=ctx, progress=progress)
    else:
        n_sys = count_tokens(ref.path, chat.system_text)
        if n_sys + 8 > ctx:
            raise ContextOverflowError(f"the system prompt takes {n_sys} tokens; the context is {ctx}: "
                                       "shorten it or raise --ctx")
    runtime = _runtime(chosen, target, plan, ctx, max_tokens)
    m = manifests.build(model_name=name, model_format=FORMAT_OF[chosen], files=files, runtime=runtime, chat=chat,
                        plan=plan.to_dict(), fit={**fit.to_dict(), "phone": board.to_dict()}, system_state=state)
    return Source(chosen, ref.path, files, m, chat, state_file, warnings, staging)


def _runtime(backend: str, target: str, plan, ctx: int, max_tokens: int) -> dict:
    if backend == "onnx":
        # onnxruntime-genai registers providers by name; NNAPI has no such registration in genai (and
        # Android 15 deprecates it), so a plan that picks NNAPI for a portable graph runs XNNPACK here
        provider = "xnnpack" if plan.device in ("xnnpack", "nnapi") else "cpu"
        return {"name": "onnxruntime-genai", "version": natives.GENAI_VERSION, "onnxruntime": natives.ORT_VERSION,
                "provider": provider, "threads": plan.threads, "n_ctx": ctx, "max_tokens": max_tokens}
    return {"name": "llama.cpp", "version": f"b{natives.LLAMA_CPP_BUILD}-{natives.LLAMA_CPP_COMMIT}",
            "provider": "metal" if target == "ios" else "cpu", "threads": plan.threads, "n_ctx": ctx,
            "max_tokens": max_tokens, "flash_attn": True, "type_k": "f16", "type_v": "f16"}


def _onnx_files(model_dir: Path, work: Path) -> tuple[list[Path], dict, str | None, dict]:
    from ..converters.genai_config import write_genai_config
    from ..runtimes.onnx_backend import read_facts

    facts = read_facts(model_dir)
    if facts.get("format") != "edgellm-onnx":
        raise UnsupportedModelError(f"{model_dir} is not an edgellm ONNX export (no edgellm_onnx.json): "
                                    "export it with edgellm convert --format onnx")
    files = []
    for name in ONNX_FILES:
        p = model_dir / name
        if name == "genai_config.json" and not p.is_file():  # an export from before genai folders
            p = write_genai_config(work, facts)
        if not p.is_file():
            raise UnsupportedModelError(f"{model_dir} has no {name}: re-export it with edgellm convert --format onnx")
        files.append(p)
    specials = {}
    cfg = model_dir / "tokenizer_config.json"
    data = json.loads(cfg.read_text(encoding="utf-8"))
    for which in ("bos", "eos"):
        tok = data.get(f"{which}_token")
        specials[f"{which}_token"] = (tok.get("content", "") if isinstance(tok, dict) else tok) or ""
    return files, facts, facts.get("chat_template"), specials


def _gguf_template(path: Path) -> tuple[str | None, dict]:
    """The GGUF's chat template and its BOS/EOS texts (gguf-py reads the token list)."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field_value(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    specials = {}
    for which in ("bos", "eos"):
        idx = field_value(f"tokenizer.ggml.{which}_token_id")
        text = ""
        if tokens is not None and isinstance(idx, int) and 0 <= idx < len(tokens.data):
            text = tokens.contents(idx)
        specials[f"{which}_token"] = text if isinstance(text, str) else ""
    return field_value("tokenizer.chat_template"), specials
