"""Sampling parameters change the output distribution as documented — on llama.cpp's native chain (through
the Session API), on the numpy sampler the ONNX backend uses, and through `edgellm serve`.

The documented chain (README, runtimes/sampling.py): repetition penalty over the last 64 tokens (the prompt
included: a positive logit is divided by the penalty, a negative one multiplied), then top-k, then top-p
(the smallest prefix of the sorted candidates whose softmax mass reaches p), then min-p (logits within
ln(min_p) of the best), then temperature, then a draw seeded by `seed`. `documented()` below is that
chain written from its description; for each parameter, draws with seeds 0..N-1 must (1) never leave the
support it allows and (2) be far closer to its distribution than to the one without the parameter. A
parameter that is dropped anywhere on the way (option parsing, the server's request schema, the chain)
fails (2), and usually (1). Seeds make every draw reproducible, so the test is deterministic."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PROMPT = "Tom has a cat, a dog, a cat, a dog, a cat and a"
N = 300
BASE = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
# each parameter against the same settings without it (the distributions differ by TV ≥ 0.25 on this prompt)
CASES = {
    "top_k": dict(BASE, top_k=3),
    "top_p": dict(BASE, top_p=0.6, temperature=1.5),
    "min_p": dict(BASE, min_p=0.02),
    "repeat_penalty": dict(BASE, repeat_penalty=3.0),
}
WITHOUT = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}


def documented(logits: np.ndarray, history: list[int], *, temperature: float, top_k: int, top_p: float,
               min_p: float, repeat_penalty: float, last_n: int = 64) -> dict[int, float]:
    """token id -> probability, per the documented chain (independent of edgellm's implementation)."""
    x = logits.astype(np.float64).copy()
    if repeat_penalty != 1.0:
        for t in set(history[-last_n:]):
            x[t] = x[t] / repeat_penalty if x[t] > 0 else x[t] * repeat_penalty
    ids = np.argsort(-x, kind="stable")
    if top_k > 0:
        ids = ids[:top_k]
    if top_p < 1.0:
        p = np.exp(x[ids] - x[ids[0]])
        cum = np.cumsum(p / p.sum())
        ids = ids[:int(np.searchsorted(cum, top_p)) + 1]
    if min_p > 0.0:
        ids = ids[x[ids] >= x[ids[0]] + np.log(min_p)]
    z = x[ids] / temperature
    p = np.exp(z - z.max())
    return dict(zip(ids.tolist(), (p / p.sum()).tolist()))


def coarse(dist: dict, keys: list) -> np.ndarray:
    """Probabilities of `keys` plus one 'everything else' bin."""
    v = np.array([dist.get(k, 0.0) for k in keys])
    return np.append(v, max(0.0, 1.0 - v.sum()))


def tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def check(name: str, draws: list, want: dict, without: dict) -> None:
    """`draws` follow `want` (support and shape), not `without`."""
    assert len(draws) == N
    outside = sorted({d for d in draws if d not in want}, key=str)
    assert not outside, f"{name}: drew {outside[:5]} outside the support the parameter allows"
    keys = sorted(set(sorted(want, key=want.get)[-6:]) | set(sorted(without, key=without.get)[-6:]), key=str)
    emp = {k: draws.count(k) / N for k in set(draws)}
    e, w, o = coarse(emp, keys), coarse(want, keys), coarse(without, keys)
    assert tv(w, o) >= 0.25, f"{name}: the case does not separate the distributions ({tv(w, o):.3f})"
    assert tv(e, w) <= 0.1 and tv(e, o) >= tv(e, w) + 0.15, \
        f"{name}: draws are {tv(e, w):.3f} from the documented distribution and {tv(e, o):.3f} from the one without it"


@pytest.fixture(scope="module")
def reference(llm):
    tokens = llm.tokenize(PROMPT)
    logits = np.asarray(llm.logits(PROMPT), np.float64)
    return tokens, logits


def _expected(reference, name: str, params: dict) -> tuple[dict, dict]:
    tokens, logits = reference
    return documented(logits, tokens, **params), documented(logits, tokens, **{**params, name: WITHOUT[name]})


# Session.generate draws for the first SAME seeds, which must equal the native chain's draws for those seeds
SAME = 12


@pytest.mark.parametrize("name", list(CASES))
def test_llama_cpp_chain_follows_the_documented_distribution(llm, reference, name):
    """N seeded draws from llama.cpp's native chain, built as Session.generate builds it, all over the one
    logits row of PROMPT (the model is evaluated once, not once per draw: the row is the same every time,
    so the draws are as informative and ~100x cheaper). Session.generate itself must draw exactly the
    chain's token for each of the first SAME seeds — a parameter the Session API drops changes its chain,
    and with it most seeds' draws."""
    from edgellm.runtimes.base import SamplerConfig

    tokens, _ = reference
    params = CASES[name]
    via_session = [llm.generate(PROMPT, max_tokens=1, seed=s, **params).tokens[0] for s in range(SAME)]
    # generate(max_tokens=1) leaves the KV cache at PROMPT and llama.cpp's last logits row is PROMPT's
    assert llm.tokens == tokens
    be = llm.backend
    draws = []
    for s in range(N):
        chain = be.make_sampler(SamplerConfig(seed=s, **params), tokens)
        try:
            draws.append(be.sample_at(chain, -1))
        finally:
            be.free_sampler(chain)
    assert via_session == draws[:SAME], f"{name}: Session.generate does not draw what its sampler chain draws"
    check(name, draws, *_expected(reference, name, params))


@pytest.mark.parametrize("name", list(CASES))
def test_numpy_sampler_follows_the_documented_distribution(reference, name):
    from edgellm.runtimes.base import SamplerConfig
    from edgellm.runtimes.sampling import NumpySampler

    tokens, logits = reference
    params = CASES[name]
    draws = [NumpySampler(SamplerConfig(seed=s, **params), tokens).sample(logits.astype(np.float32))
             for s in range(N)]
    check(name, draws, *_expected(reference, name, params))


def test_seed_makes_a_sampled_answer_reproducible(llm):
    kw = dict(BASE, temperature=1.5)
    a = llm.generate(PROMPT, max_tokens=16, seed=7, **kw).tokens
    b = llm.generate(PROMPT, max_tokens=16, seed=7, **kw).tokens
    others = {tuple(llm.generate(PROMPT, max_tokens=16, seed=s, **kw).tokens) for s in (8, 9, 10)}
    assert a == b and len(others | {tuple(a)}) > 1


def test_server_passes_every_parameter_to_the_sampler(default_model_path, llm, reference):
    """The same draws through `edgellm serve`'s /v1/completions (answers compared as text pieces)."""
    from serving import MODEL, post, running

    def pieces(dist: dict) -> dict:
        out: dict[str, float] = {}
        for t, p in dist.items():
            out[llm.detokenize([t])] = out.get(llm.detokenize([t]), 0.0) + p
        return out

    with running(default_model_path, n_ctx=256, parallel=1) as url:
        for name, params in CASES.items():
            draws = []
            for s in range(N):
                status, body = post(f"{url}/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 1,
                                                              "seed": s, **params})
                assert status == 200, body
                draws.append(body["choices"][0]["text"])
            want, without = _expected(reference, name, params)
            check(f"server {name}", draws, pieces(want), pieces(without))
        bodies = [post(f"{url}/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "seed": 7,
                                                 **dict(BASE, temperature=1.5)})[1] for _ in range(2)]
        assert bodies[0]["choices"][0]["text"] == bodies[1]["choices"][0]["text"]
