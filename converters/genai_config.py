"""genai_config.json: makes edgellm's ONNX directory an onnxruntime-genai model folder as well.

onnxruntime-genai (the runtime Microsoft ships for phones: Android AAR, iOS xcframework, a C API)
loads a folder holding a decoder graph, tokenizer.json and this file. edgellm's graphs already follow
genai's tensor convention (input_ids, attention_mask, past_key_values.N.key/value -> logits,
present.N.key/value), so the file only describes what is there; the mobile app packages run the
folder through genai's C API, with its tokenizer and generation loop. The `num_logits_to_keep`
input the graph also takes is one genai feeds itself (it is how its own builder trims prompt logits).
"""
from __future__ import annotations

import json
from pathlib import Path

CONFIG_FILE = "genai_config.json"
# model types onnxruntime-genai runs as a plain decoder (same loop, same tensor names)
_GENAI_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo"}


def genai_config(facts: dict, *, max_length: int | None = None, num_attention_heads: int | None = None) -> dict:
    """genai_config.json for an edgellm ONNX directory described by `facts` (edgellm_onnx.json).

    max_length: the longest sequence a generator may reach (default: the model's context);
    num_attention_heads: query heads (default: hidden_size / head_dim, the llama layout)."""
    ctx = int(facts["context_length"])
    heads = num_attention_heads or int(facts["hidden_size"]) // int(facts["head_dim"])
    special = facts.get("special_ids") or {}
    eos = [int(i) for i in facts.get("eog_ids") or [special.get("eos")] if i is not None]
    if not eos:
        raise ValueError("the model has no end-of-generation token: genai could not stop")
    # the stop genai reports first is the model's own eos, then the other end-of-turn tokens
    eos.sort(key=lambda i: i != special.get("eos"))
    arch = str(facts.get("architecture") or "decoder")
    return {
        "model": {
            "type": arch if arch in _GENAI_TYPES else "decoder",
            "bos_token_id": int(_or(special.get("bos"), eos[0])),
            "eos_token_id": eos,
            "pad_token_id": int(_or(special.get("pad"), eos[0])),
            "context_length": ctx,
            "vocab_size": int(facts["vocab_size"]),
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": int(facts["head_dim"]),
                "hidden_size": int(facts["hidden_size"]),
                "num_attention_heads": heads,
                "num_hidden_layers": int(facts["num_hidden_layers"]),
                "num_key_value_heads": int(facts["num_key_value_heads"]),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        # greedy unless the caller sets sampling options; the KV cache grows with the sequence
        # (a shared max_length buffer would allocate the whole context up front: 377 MB in float32
        # for SmolLM2's 8,192 tokens, too much for a phone, and the portable graph's concatenating
        # attention cannot write into one)
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": max_length or ctx,
                   "min_length": 0, "top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
                   "early_stopping": True, "past_present_share_buffer": False},
    }


def _or(value, default):
    return default if value is None else value


def write_genai_config(model_dir: Path, facts: dict, **kw) -> Path:
    """Write genai_config.json beside the graph (into a directory still being assembled)."""
    path = Path(model_dir) / CONFIG_FILE
    path.write_text(json.dumps(genai_config(facts, **kw), indent=2) + "\n", encoding="utf-8")
    return path
