"""Tokenizing with llama.cpp's own vocabulary: for a loaded model, or a GGUF file's vocabulary alone."""
from __future__ import annotations

from pathlib import Path

from edgellm.errors import BackendError

from .llama_lib import init_native_logging


def tokenize_vocab(ll, vocab, text: str, add_special: bool, parse_special: bool) -> list[int]:
    """llama_tokenize with a buffer that grows to what llama.cpp asks for."""
    data = text.encode("utf-8")
    cap = len(data) + 8
    buf = (ll.llama_token * cap)()
    n = ll.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
    if n < 0:
        cap = -n
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
    if n < 0:
        raise BackendError("llama.cpp failed to tokenize the text")
    return list(buf[:n])


def tokenize_file(path: str | Path, text: str, *, parse_special: bool = True) -> list[int]:
    """`text` tokenized by llama.cpp with only the GGUF's vocabulary loaded (BOS added if the model wants it).

    A full load would map every weight (a 4 GB F32 staging file becomes 4 GB of resident pages);
    converters only need the tokenizer.
    """
    import llama_cpp as ll

    init_native_logging()
    params = ll.llama_model_default_params()
    params.vocab_only = True
    model = ll.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise BackendError(f"llama.cpp could not read the vocabulary of {path}")
    try:
        vocab = ll.llama_model_get_vocab(model)
        return tokenize_vocab(ll, vocab, text, bool(ll.llama_vocab_get_add_bos(vocab)), parse_special)
    finally:
        ll.llama_model_free(model)
