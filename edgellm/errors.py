"""One error hierarchy for everything a user can get wrong or run into.

Each class carries the CLI exit code it maps to, so scripts can tell failures apart
without parsing messages. Messages are one line and say what to do next.
"""
from __future__ import annotations


class EdgeLLMError(Exception):
    """Base of every user-facing edgellm failure."""

    exit_code = 1

    def __str__(self) -> str:  # always one line, whatever the caller passed
        return " ".join(str(self.args[0] if self.args else self.__class__.__name__).split())


class UsageError(EdgeLLMError):
    """Bad options or arguments."""

    exit_code = 2


class ModelNotFoundError(EdgeLLMError):
    """No model under that alias, path or directory."""

    exit_code = 3


class InvalidModelError(EdgeLLMError):
    """The model file is corrupt, truncated or structurally unsafe."""

    exit_code = 4


class UnsupportedModelError(EdgeLLMError):
    """A well-formed model edgellm cannot handle (architecture, type, format)."""

    exit_code = 5


class InsufficientMemoryError(EdgeLLMError):
    """The model (plus context) will not fit in the memory available."""

    exit_code = 6


class BackendError(EdgeLLMError):
    """A backend is unavailable on this device or failed at run time."""

    exit_code = 7


class ContextOverflowError(EdgeLLMError):
    """The prompt and requested output do not fit the context window."""

    exit_code = 8


class StoreError(EdgeLLMError):
    """The model store could not obtain, verify or write a model."""

    exit_code = 9


class CacheError(EdgeLLMError):
    """A KV-cache state is unusable (wrong model, corrupt) where the caller required it."""

    exit_code = 10


class ConversionError(EdgeLLMError):
    """A conversion step (read, quantize, export) failed."""

    exit_code = 11


class TemplateError(EdgeLLMError):
    """The chat template failed to render."""

    exit_code = 12


class GenerationInterrupted(EdgeLLMError):
    """The user interrupted generation (Ctrl-C)."""

    exit_code = 130


class MissingToolError(EdgeLLMError):
    """An external tool a command needs (apt or npm package) is not installed; the message names it."""

    exit_code = 13


class PackagingError(EdgeLLMError):
    """Building a mobile app package failed (a pinned binary, a build step, a check of the result)."""

    exit_code = 14
