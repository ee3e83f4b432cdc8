"""How much each weight matters to the output distribution: the diagonal Fisher information.

To second order, perturbing weights by δ raises the KL divergence from the original model by
½ Σ F ∘ δ², where F is the Fisher information of the model's own next-token distribution. For a
linear layer y = W x the per-token diagonal is exactly (g²)ᵀ(x²) summed over tokens (g = ∂ℓ/∂y),
so one forward + backward pass per calibration chunk gives every tensor's F without per-weight
gradients. Labels are sampled from the model itself (the true Fisher, not the empirical one).

torch and transformers do the autograd (converters/torch_llama.py builds the model; the `convert` extra);
hand-written here is only the accumulation of (g²)ᵀ(x²) in module hooks.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

from edgellm.errors import UsageError

from .checkpoint import Checkpoint


def fisher_diagonals(ckpt: Checkpoint, tokens: Sequence[int], *, chunk: int = 512, seed: int = 0,
                     threads: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Per-token-summed diagonal Fisher of every 2-D weight (HF names and layout) and the token count.

    Embedding rows are looked up, not multiplied: a row's share is the stream gradient's energy spread
    evenly over the vocabulary (calibration text touches few rows; held-out text touches others).
    Tied embeddings get the lookup's share plus the head's.
    """
    try:
        import torch
    except ImportError:
        raise UsageError("measuring sensitivity needs the converter extra: pip install 'edgellm[convert]'") from None

    from .torch_llama import to_torch

    model = to_torch(ckpt, threads).requires_grad_(False)
    names = {m: n for n, m in model.named_modules()}
    acc: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    emb = model.get_input_embeddings()
    emb_energy = torch.zeros(ckpt.config.hidden_size)

    def fwd(module, args, output):
        inputs[names[module]] = args[0].detach().reshape(-1, args[0].shape[-1]).square()

    def bwd(module, grad_in, grad_out):
        name = names[module]
        g2 = grad_out[0].reshape(-1, grad_out[0].shape[-1]).square()
        f = g2.T @ inputs.pop(name)
        key = f"{name}.weight"
        acc[key] = acc[key] + f if key in acc else f

    def emb_fwd(module, args, output):
        return output.requires_grad_()   # gradients flow through activations only, never into weights

    def emb_bwd(module, grad_in, grad_out):
        nonlocal emb_energy
        emb_energy += grad_out[0].reshape(-1, grad_out[0].shape[-1]).square().sum(0)

    hooks = [emb.register_forward_hook(emb_fwd), emb.register_full_backward_hook(emb_bwd)]
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            hooks += [module.register_forward_hook(fwd), module.register_full_backward_hook(bwd)]
    gen = torch.Generator().manual_seed(seed)
    starts = list(range(0, len(tokens), chunk))
    n = 0
    try:
        for i, s in enumerate(starts):
            ids = torch.tensor([list(tokens[s:s + chunk])])
            logits = model(input_ids=ids).logits[0]
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
            with warnings.catch_warnings():   # "hook fires for module outputs": that is exactly what we want
                warnings.filterwarnings("ignore", message="Full backward hook")
                torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
            n += ids.shape[1]
            if progress:
                progress(i + 1, len(starts))
    finally:
        for h in hooks:
            h.remove()
    out = {k: v.numpy() for k, v in acc.items()}
    vocab = ckpt.config.vocab_size
    lookup = np.broadcast_to((emb_energy / vocab).numpy(), (vocab, ckpt.config.hidden_size))
    key = "model.embed_tokens.weight"
    if ckpt.config.tie_word_embeddings:
        out[key] = out.pop("lm_head.weight") + lookup
    else:
        out[key] = np.array(lookup)
    return out, n


__all__ = ["fisher_diagonals"]
