"""The Core ML path of `edgellm package ios`: a stateful .mlpackage from `edgellm convert --format coreml`.

The package and the files swift-transformers reads beside it (config.json, tokenizer.json,
tokenizer_config.json) become the Swift package's resources. Before anything is written the package
passes the Core ML exporter's own checks (runtimes/coreml_package.py: structure, weight blobs, the
manifest in its metadata) and its I/O must be swift-transformers' stateful contract, which the
package's Swift generation loop (templates/ios/.../CoreMLEngine.swift) is written against.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Callable

from .. import memplan
from ..errors import ContextOverflowError, InsufficientMemoryError, UnsupportedModelError
from ..plan import RUNTIME_OVERHEAD_BYTES, choose
from . import manifest as manifests
from .parts import Source, count_tokens, phone_profile

Progress = Callable[[str, int, int], None]
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
RESOURCE_NAME = "model.mlpackage"
CONTRACT = {"inputs": {"inputIds", "causalMask"}, "states": {"keyCache", "valueCache"}, "outputs": {"logits"}}


def check_contract(package) -> dict:
    """The package's I/O, refused unless it is swift-transformers' stateful contract."""
    from ..runtimes.coreml_package import io_contract, load_spec

    io = io_contract(load_spec(package))
    for kind, names in CONTRACT.items():
        if set(io[kind]) != names:
            raise UnsupportedModelError(f"{package.name} has {kind} {sorted(io[kind])}, not swift-transformers' "
                                        f"{sorted(names)}: export it with edgellm convert --format coreml")
    return io


def coreml_source(ref, *, system: str | None, phone: memplan.Board, n_ctx: int, max_tokens: int,
                  threads: int | None, staging: tempfile.TemporaryDirectory, progress: Progress | None = None):
    from ..runtime_coreml import coreml_facts, state_bytes

    package = ref.path
    artifact, facts = coreml_facts(package)   # structure and weight blobs checked, metadata read
    check_contract(package)
    side = [package.parent / name for name in SIDE_FILES]
    missing = [p.name for p in side if not p.is_file()]
    if missing:
        raise UnsupportedModelError(f"{', '.join(missing)} missing beside {package.name} (swift-transformers reads "
                                    "them): export with edgellm convert --format coreml, which writes them")
    ctx = min(n_ctx, int(facts["context_length"]))  # the KV state's size is fixed at export
    need = artifact.size_bytes + state_bytes(facts) + RUNTIME_OVERHEAD_BYTES
    fit = memplan.FitReport(phone.name, phone.usable_bytes, need, need <= phone.usable_bytes, phone.usable_bytes - need)
    name = facts.get("name") or package.stem
    if not fit.fits:
        raise InsufficientMemoryError(f"{name} needs about {need / 2**20:.0f} MiB (weights + its "
                                      f"{facts['context_length']}-token KV state) but a {phone.name} phone leaves an "
                                      f"app about {phone.usable_bytes / 2**20:.0f} MiB: export a shorter --ctx")
    tok_cfg = json.loads((package.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = {}
    for which in ("bos", "eos"):
        tok = tok_cfg.get(f"{which}_token")
        specials[f"{which}_token"] = (tok.get("content", "") if isinstance(tok, dict) else tok) or ""
    chat = manifests.chat_pieces(facts.get("chat_template"), system, **specials)
    n_sys = count_tokens(package.parent, chat.system_text)
    if n_sys + 8 > ctx:
        raise ContextOverflowError(f"the system prompt takes {n_sys} tokens; the context is {ctx}: shorten it")
    plan = choose(phone_profile(phone, "ios"), artifact, threads=threads, n_ctx=ctx, memory_bytes=need)
    runtime = {"name": "coreml", "version": "iOS 18 (MLState)", "provider": "all" if plan.device == "ane" else "cpu",
               "threads": plan.threads, "n_ctx": ctx, "max_tokens": max_tokens, "quant": facts.get("quant")}
    files = [package, *side]
    m = manifests.build(model_name=name, model_format="coreml", files=files, runtime=runtime, chat=chat,
                        plan=plan.to_dict(), fit={**fit.to_dict(), "phone": phone.to_dict()})
    m["stop_ids"] = [int(i) for i in facts.get("eog_ids") or [facts["special_ids"]["eos"]]]
    # the Swift finds the package as model.mlpackage (compiled by Xcode to model.mlmodelc)
    m["files"] = [RESOURCE_NAME if f == package.name else f for f in m["files"]]
    m["model"]["files"] = {RESOURCE_NAME if k == package.name else k: v for k, v in m["model"]["files"].items()}
    return Source("coreml", package, files, m, chat, None, [], staging)
