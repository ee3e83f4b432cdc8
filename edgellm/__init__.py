"""edgellm: convert LLMs for devices and run them with the right backend.

    >>> import edgellm
    >>> llm = edgellm.load()            # the embedded SmolLM2-135M, backend chosen for this device
    >>> llm.chat([{"role": "user", "content": "Hi!"}], temperature=0).text
    >>> edgellm.convert("smollm2-135m", "small.gguf", quant="Q4_K_M")   # needs the `convert` extra

Attributes are imported lazily so `import edgellm` (and the CLI's start-up) stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import EdgeLLMError

__version__ = "0.1.0"

_LAZY = {
    "load": ".runtime", "Session": ".session", "Conversation": ".session", "Completion": ".session",
    "Stats": ".session", "SamplerConfig": ".runtimes.base", "GREEDY": ".runtimes.base",
    "SpeculationConfig": ".speculate",
    "pull": ".store", "DEFAULT_ALIAS": ".store",
    # converting (the `convert` extra): GGUF quantization, ONNX and Core ML export, pruning, distillation
    "convert": ".converters.pipeline", "export_onnx": ".converters.onnx_export:convert_to_onnx",
    "export_coreml": ".converters.coreml_export:convert_to_coreml", "prune": ".shrink", "distill": ".shrink",
}
__all__ = ["EdgeLLMError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, _, attr = _LAZY[name].partition(":")
        return getattr(importlib.import_module(module, __name__), attr or name)
    raise AttributeError(f"module 'edgellm' has no attribute {name!r}")
