"""A Checkpoint as a transformers model and back: what importance scoring and distillation run on.

transformers' own Llama/Qwen2/Mistral modelling code is the torch forward (no hand-written twin); the
Checkpoint keeps HF names and layouts, so its tensors are the model's state dict as they are.
Needs the `convert` extra (torch, transformers, tokenizers).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgellm.errors import UnsupportedModelError

from .checkpoint import Checkpoint, ModelConfig, TensorSource, hf_tensor_shapes

if TYPE_CHECKING:
    import torch


def to_torch(ckpt: Checkpoint, threads: int | None = None) -> Any:
    """A float32 transformers *ForCausalLM holding `ckpt`'s weights (eval mode)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    hf = ckpt.config.to_hf_config()
    try:
        config = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
    except ValueError as e:  # transformers validates dims (e.g. hidden size a multiple of the head count)
        raise UnsupportedModelError(f"transformers cannot build this model: "
                                    f"{str(e).splitlines()[-1].strip()}") from None
    config._attn_implementation = "sdpa"
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():   # every weight is overwritten below: skip the random init (seconds per model)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)) for name, data in ckpt.tensors}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and ckpt.config.tie_word_embeddings)]
    if missing or unexpected:  # pragma: no cover - hf_tensor_shapes and transformers agree on names
        raise UnsupportedModelError(f"weights do not match transformers' model: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}")
    if ckpt.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def from_torch(model: Any, config: ModelConfig, like: Checkpoint, name: str | None = None) -> Checkpoint:
    """A Checkpoint over the model's current weights (copied once, so later training does not change it)."""
    state = model.state_dict()
    shapes = hf_tensor_shapes(config)
    data = {n: state[n].detach().to("cpu", copy=True).float().numpy() for n in shapes}
    return Checkpoint(config, TensorSource(shapes, lambda n: data[n], {n: "F32" for n in shapes}), like.tokenizer,
                      name=name or like.name)


def hf_tokenizer(ckpt: Checkpoint) -> Any:
    """The `tokenizers` tokenizer of a checkpoint: its own tokenizer.json, or one built from GGUF metadata."""
    from tokenizers import Tokenizer

    from .hf_writer import build_tokenizer_json

    text = ckpt.tokenizer.hf_files.get("tokenizer.json") or build_tokenizer_json(ckpt.tokenizer)
    return Tokenizer.from_str(text)


def tokenize(ckpt: Checkpoint, text: str) -> list[int]:
    return hf_tokenizer(ckpt).encode(text, add_special_tokens=False).ids


def batch_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(input_ids=tokens).logits
