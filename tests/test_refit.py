"""Pruning with compensation (converters/refit.py): the closed-form refit is the direct least-squares solution,
it lowers the output error on held-out activations, dead structures still go first, and pruned models stay
standard checkpoints that are closer to the teacher than the plain cut."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from edgellm.converters.calibrate import dims_of, weight_getter
from edgellm.converters.prune import Shape, apply_plan, make_plan, n_params, prune_model, refit_candidate
from edgellm.converters.reference import forward
from edgellm.converters.refit import Sums, fit_error, layer_scores, obs_select, refit_model, ridge
from edgellm.converters.torch_llama import tokenize
from edgellm.texts import calibration_text, heldout_text


def _solve_direct(x, y, w0, lam):
    """Ridge towards w0 as one stacked least-squares problem: [X; √λ I] Wᵀ = [Y; √λ W0ᵀ]."""
    d = x.shape[1]
    a = np.vstack([x, np.sqrt(lam) * np.eye(d)])
    b = np.vstack([y, np.sqrt(lam) * w0.T])
    return np.linalg.lstsq(a, b, rcond=None)[0].T


def test_ridge_equals_a_direct_solve_and_obs_picks_the_best_single_removal():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))
    y = x @ rng.standard_normal((6, 4)) + 0.1 * rng.standard_normal((200, 4))
    w0 = rng.standard_normal((4, 6))
    s = Sums()
    s.add(x, y)
    alpha = 0.05
    lam = alpha * np.trace(s.gram) / 6
    np.testing.assert_allclose(ridge(s.cross, s.gram, w0, alpha), _solve_direct(x, y, w0, lam), rtol=1e-8, atol=1e-9)
    w = ridge(s.cross, s.gram, w0, alpha)
    assert fit_error(s.yy, s.cross, s.gram, w) == pytest.approx(((y - x @ w.T) ** 2).sum(), rel=1e-9)
    # removing one column: OBS keeps exactly the five whose plain least-squares refit leaves the least error
    errors = {}
    for keep in itertools.combinations(range(6), 5):
        k = list(keep)
        wk = np.linalg.lstsq(x[:, k], y, rcond=None)[0].T
        errors[keep] = ((y - x[:, k] @ wk.T) ** 2).sum()
    best = min(errors, key=errors.get)
    assert tuple(obs_select(s.cross, s.gram, [np.array([c]) for c in range(6)], 5, alpha=1e-9)) == best
    # groups: keep the pair of column pairs whose refit is best
    pairs = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    errs = {}
    for keep in itertools.combinations(range(3), 2):
        cols = np.concatenate([pairs[g] for g in keep])
        wk = np.linalg.lstsq(x[:, cols], y, rcond=None)[0].T
        errs[keep] = ((y - x[:, cols] @ wk.T) ** 2).sum()
    assert tuple(obs_select(s.cross, s.gram, pairs, 2, alpha=1e-9)) == min(errs, key=errs.get)


def test_obs_greedy_steps_equal_brute_force_refits_over_many_removals():
    """obs_select keeps (W0 − W) H⁻¹ up to date by rank-|R| updates; every step must still pick the column whose
    removal, with the rest refitted by the same ridge towards W0, leaves the least output error."""
    rng = np.random.default_rng(1)
    n = 12
    x = rng.standard_normal((300, n)) @ rng.standard_normal((n, n)) * rng.gamma(1.0, 1.0, n)
    y = x @ rng.standard_normal((n, 5)) + 0.3 * rng.standard_normal((300, 5))
    w0 = rng.standard_normal((5, n))
    s = Sums()
    s.add(x, y)
    alpha = 0.2
    lam = alpha * np.trace(s.gram) / n

    def refit_error(cols):
        g, c = s.gram[np.ix_(cols, cols)], s.cross[:, cols]
        w = np.linalg.solve(g + lam * np.eye(len(cols)), (c + lam * w0[:, cols]).T).T
        return fit_error(s.yy, c, g, w)

    alive = list(range(n))
    while len(alive) > 3:
        alive.remove(min(alive, key=lambda c: refit_error([a for a in alive if a != c])))
        got = obs_select(s.cross, s.gram, [np.array([c]) for c in range(n)], len(alive), alpha=alpha, w0=w0)
        assert got == alive
    # removing three per step follows the same scores, so the first batch is the three cheapest single removals
    first = sorted(range(n), key=lambda c: refit_error([a for a in range(n) if a != c]))[:3]
    got = obs_select(s.cross, s.gram, [np.array([c]) for c in range(n)], n - 3, alpha=alpha, w0=w0, batch=3)
    assert got == sorted(set(range(n)) - set(first))


def _ffn_io(teacher, tokens, layer):  # noqa: F811
    """down_proj's input (the activations) of one layer of the teacher, over tokens in chunks of 128."""
    dims, get = dims_of(teacher.config), weight_getter(teacher)
    acts = []
    for s in range(0, len(tokens), 128):
        forward(dims, get, tokens[s:s + 128], logits=False,
                hook=lambda n, x: acts.append(x.copy()) if n == f"blk.{layer}.ffn_down.weight" else None)
    return np.concatenate(acts)


def test_refit_lowers_the_layer_output_error_on_held_out_activations(teacher, calib_tokens, importance):  # noqa: F811
    layer, keep = 7, 768
    w = teacher.tensors.load(f"model.layers.{layer}.mlp.down_proj.weight")
    calib = _ffn_io(teacher, tokenize(teacher, calibration_text())[:1024], layer)
    held = _ffn_io(teacher, tokenize(teacher, heldout_text())[:512], layer)
    s = Sums()
    s.add(calib, calib @ w.T)
    chosen = np.asarray(obs_select(s.cross, s.gram, [np.array([k]) for k in range(w.shape[1])], keep, batch=32,
                                   w0=w))
    refit = ridge(s.cross[:, chosen], s.gram[np.ix_(chosen, chosen)], w[:, chosen])
    by_importance = np.sort(np.argsort(-importance.ffn[layer])[:keep])
    y = held @ w.T

    def err(cols, wk):
        return float(((y - held[:, cols] @ wk.T) ** 2).sum() / (y ** 2).sum())

    plain, refitted, obs_plain = err(by_importance, w[:, by_importance]), err(chosen, refit), err(chosen, w[:, chosen])
    # On tokens the refit never saw. Measured (layer 7, half the neurons): plain 0.371, refitted 0.259 (0.70x);
    # 4k or 8k calibration tokens give 0.70x / 0.67x and α from 0.3 to 3 changes little, while the refit's
    # error on its own 8k calibration tokens is already 0.18-0.21: a linear refit of the kept columns cannot
    # reach 0.5x. Broken refits fail this bound: the sliced weights on the same choice 0.79x, ridge α = 0.3
    # 0.77x, α = 0.01 1.65x, no ridge (α = 1e-6) 3.1x.
    assert refitted < 0.75 * plain
    assert refitted < obs_plain              # the refit itself, not only the choice, does the work


def test_dead_neurons_heads_and_layers_are_still_removed_first(teacher, calib_tokens):  # noqa: F811
    data = {n: w.copy() for n, w in teacher.tensors}
    L = "model.layers.{}."
    data[L.format(4) + "mlp.up_proj.weight"][777] = 0                      # FFN neuron 777 of layer 4 never fires
    data[L.format(9) + "self_attn.o_proj.weight"][:, 5 * 64:6 * 64] = 0    # query head 5 of layer 9 writes nothing
    for part in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):       # layer 20 writes nothing
        data[L.format(20) + part][:] = 0
    broken = dataclasses.replace(teacher, tensors=dataclasses.replace(teacher.tensors, load=data.__getitem__))
    chunks = [calib_tokens[:64], calib_tokens[64:128]]
    scores = layer_scores(broken, chunks)
    assert scores.replaced.argmin() == 20 and scores.replaced[20] < 1e-9
    res = refit_model(broken, chunks, layers=[i for i in range(30) if i != 20], hidden=np.arange(576), ffn=1535,
                      n_kv=3, q_per_kv=2)
    assert 777 not in res.ffn[4] and len(res.ffn[4]) == 1535
    assert 5 not in res.heads[9] and len(res.heads[9]) == 6
    assert [sum(h // 3 == g for h in res.heads[9]) for g in range(3)] == [2, 2, 2]   # uniform per KV group


@pytest.mark.slow
def test_refitted_candidate_is_a_standard_checkpoint_closer_to_the_teacher(
        teacher, importance, tmp_path):  # noqa: F811
    import torch

    import edgellm
    from edgellm.converters.gguf_writer import write_gguf
    from edgellm.converters.prune import kl_to
    from edgellm.converters.torch_llama import to_torch

    tokens = tokenize(teacher, calibration_text())[:512]
    chunks = [tokens[i:i + 256] for i in range(0, 512, 256)]
    shape = Shape(28, 576, 1024, 3, 2)
    scores = layer_scores(teacher, chunks)
    plan, refitted = refit_candidate(teacher, importance, scores, shape, chunks)
    plain = apply_plan(teacher, make_plan(teacher.config, importance, shape))
    assert n_params(refitted.config) == n_params(plain.config)
    ids = torch.tensor([tokenize(teacher, heldout_text())[:384]])
    with torch.no_grad():
        ref = to_torch(teacher)(input_ids=ids).logits
    kl_refit, _ = kl_to(ref, to_torch(refitted), ids)
    kl_plain, _ = kl_to(ref, to_torch(plain), ids)
    assert kl_refit < 0.6 * kl_plain, (kl_refit, kl_plain)  # 512 calibration tokens: 1.13 vs 2.88 here
    assert plan.fits and all(f.after <= f.before + 1e-9 for f in plan.fits)
    path = tmp_path / "refit.gguf"
    write_gguf(refitted, path, "F16")
    with edgellm.load(path, n_ctx=128, disk_cache=False, sampler=edgellm.GREEDY) as s:
        assert len(s.generate("The capital of France is", max_tokens=4).tokens) > 0


def test_pruning_nothing_with_refit_is_still_the_teacher(teacher):  # noqa: F811
    res = prune_model(teacher, n_params(teacher.config), calib_tokens=64, refit=True)
    for name, w in teacher.tensors:
        assert np.array_equal(res.checkpoint.tensors.load(name), w), name
