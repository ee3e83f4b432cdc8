"""Calibration-based importance of every prunable structure: layers, FFN neurons, attention heads, hidden channels.

One pass of the model (transformers, via torch_llama) over calibration text, with forward hooks:
- layer: block influence, 1 - cos(residual in, residual out) averaged over tokens (ShortGPT); a layer
  that leaves the residual stream unchanged scores 0;
- FFN neuron j: E[a_j^2] * ||W_down[:, j]||^2, the expected energy it writes into the residual stream;
- query head h: E[||o_h W_o[:, h]^T||^2], the energy its share of o_proj writes; a KV group scores the sum
  of its query heads (grouped-query attention prunes query heads with their group);
- hidden channel c: sum over every RMSNorm output of E[y_c^2] (Minitron's embedding-channel score).
RMSNorm inputs' mean squares are kept too, to rescale norms when hidden channels are removed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgellm.errors import UsageError

from .checkpoint import Checkpoint

MIN_TOKENS = 64


@dataclass
class Importance:
    layer: np.ndarray        # (L,) block influence
    ffn: np.ndarray          # (L, F)
    head: np.ndarray         # (L, H) per query head
    hidden: np.ndarray       # (D,)
    norm_in_sq: dict[str, np.ndarray]   # RMSNorm weight name -> E[x_c^2] of its input, (D,)
    tokens: int

    @property
    def group(self) -> np.ndarray:
        """(L, KV) score of each KV head group: the sum of its query heads."""
        n_layer, n_head = self.head.shape
        return self.head.reshape(n_layer, self.n_kv, n_head // self.n_kv).sum(axis=2)

    n_kv: int = 1


def compute_importance(ckpt: Checkpoint, tokens: Sequence[int], *, chunk: int = 256, model=None,
                       progress: Callable[[int, int], None] | None = None) -> Importance:
    """Score every structure of `ckpt` on `tokens` (calibration text, never the held-out text)."""
    import torch

    from .torch_llama import to_torch

    if len(tokens) < MIN_TOKENS:
        raise UsageError(f"the calibration text has only {len(tokens)} tokens; importance scores need at least "
                         f"{MIN_TOKENS} (give more text with --calib)")
    c = ckpt.config
    model = model if model is not None else to_torch(ckpt)
    layers = model.model.layers
    acc: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        acc[key] = acc[key] + value if key in acc else value.double()

    hooks = []
    for i, layer in enumerate(layers):
        w_down_sq = (layer.mlp.down_proj.weight.detach() ** 2).sum(0).double()   # (F,)
        w_o = layer.self_attn.o_proj.weight.detach().reshape(c.hidden_size, c.num_attention_heads, c.head_dim)

        def ffn_hook(_m, args, i=i, w=w_down_sq):
            a = args[0].detach().reshape(-1, args[0].shape[-1])
            add(f"ffn{i}", (a.double() ** 2).sum(0) * w)

        def head_hook(_m, args, i=i, w=w_o):
            x = args[0].detach().reshape(-1, c.num_attention_heads, c.head_dim)
            y = torch.einsum("nhd,ohd->nho", x, w)   # each head's write into the residual stream
            add(f"head{i}", (y.double() ** 2).sum(dim=(0, 2)))

        def layer_hook(_m, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.detach().double(), y.detach().double(), dim=-1)
            add(f"bi{i}", (1 - cos).sum())

        hooks.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_hook))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook))
    norms = {f"model.layers.{i}.{n}.weight": getattr(layer, n)
             for i, layer in enumerate(layers) for n in ("input_layernorm", "post_attention_layernorm")}
    norms["model.norm.weight"] = model.model.norm
    for name, mod in norms.items():
        def norm_hook(_m, args, out, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            add(f"in:{name}", (x ** 2).sum(0))
            add("hidden", (out.detach().reshape(-1, out.shape[-1]).double() ** 2).sum(0))
        hooks.append(mod.register_forward_hook(norm_hook))

    starts = list(range(0, len(tokens) - 1, chunk))
    n = 0
    try:
        with torch.no_grad():
            for k, s in enumerate(starts):
                ids = torch.tensor([list(tokens[s:s + chunk])])
                model.model(input_ids=ids)
                n += ids.shape[1]
                if progress:
                    progress(k + 1, len(starts))
    finally:
        for h in hooks:
            h.remove()
    L = len(layers)
    get = lambda key: (acc[key] / n).numpy()  # noqa: E731
    return Importance(
        layer=np.array([float(get(f"bi{i}")) for i in range(L)]),
        ffn=np.stack([get(f"ffn{i}") for i in range(L)]), head=np.stack([get(f"head{i}") for i in range(L)]),
        hidden=get("hidden"), norm_in_sq={k: get(f"in:{k}") for k in norms}, tokens=n, n_kv=c.num_key_value_heads)

