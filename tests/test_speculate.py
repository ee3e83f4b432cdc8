"""Prompt-lookup speculative decoding (edgellm.speculate, edgellm.speculative_loop).

Greedy output with speculation must be token-identical to plain decoding (on llama.cpp and on the
ONNX backend), and the draft counters prove drafts were accepted, so the identity cannot hold because
speculation was silently off. With sampling, `sampled_verify` must leave each emitted token's
distribution exactly the target one: checked by a chi-square test on a 6-token vocabulary, which a
broken rule (always accept, or resample without removing the draft token) fails. max_tokens, stop
strings, streaming pieces and the KV cache stay exactly as plain decoding leaves them.
"""
from __future__ import annotations

import numpy as np
import pytest

import edgellm
from edgellm import GREEDY, SamplerConfig, SpeculationConfig
from edgellm.errors import UsageError
from edgellm.runtimes.sampling import distribution, penalized
from edgellm.speculate import Controller, NgramIndex, greedy_verify, sampled_verify

PASSAGE = (
    "The river town of Alder Bend sits where two valleys meet. Every spring the snowmelt swells the water, and "
    "the old stone bridge, built in 1820 by a mason named Thomas Reed, carries farmers, schoolchildren and the "
    "weekly mail coach across the flood. The town council has argued for a decade about whether to replace the "
    "bridge with a wider steel span, but the historical society insists that the arches must stay. Last year a "
    "compromise was reached: the old bridge will be kept for walkers and cyclists, and a new crossing will be "
    "built two hundred metres downstream, out of sight of the market square. Work begins in the autumn, after "
    "the harvest festival, when the river is at its lowest and the fields are empty."
)
GROUNDED = f"Repeat this text exactly:\n\n{PASSAGE}\n\nRepeated text:\n\n"
FREE = "Write a short story about a lighthouse keeper who finds a message in a bottle."


# the mechanism tests draft whenever a match exists (a fixed zero row cost): identity must hold however much is
# drafted, and how much speculate=True drafts depends on this device's timings (the cost model follows them)
FORCED = SpeculationConfig(row_cost=0.0)


def _both(session, prompt, speculate=FORCED, **kw):
    plain = session.generate(prompt, speculate=False, **kw)
    spec = session.generate(prompt, speculate=speculate, **kw)
    return plain, spec


# -- greedy identity, real model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_spec(default_model_path):
    s = edgellm.load(default_model_path, n_ctx=2048, disk_cache=False, sampler=GREEDY, speculate=FORCED)
    yield s
    s.close()


def test_default_is_on_only_where_batches_equal_single_steps(default_model_path):
    """load()'s default (AUTO): llama.cpp's batch kernels move logits (~0.6), so it decodes plainly there; a
    grounded prompt that drafts well when asked (the tests below) drafts nothing by default."""
    assert edgellm.load.__kwdefaults__["speculate"] is None
    with edgellm.load(default_model_path, n_ctx=1024, disk_cache=False, sampler=GREEDY) as s:
        assert s.speculation.auto and s.backend.name == "llama.cpp"
        assert s.generate(GROUNDED, max_tokens=40).stats.drafted == 0
        assert s.generate(GROUNDED, max_tokens=40, speculate=True).stats.drafted > 0


def test_greedy_identical_on_grounded_prompt_and_drafts_accepted(llm_spec):
    plain, spec = _both(llm_spec, GROUNDED, max_tokens=160)
    assert spec.tokens == plain.tokens and spec.text == plain.text
    assert plain.stats.drafted == 0
    assert spec.stats.accepted >= 60, spec.stats  # the copy is mostly drafted
    assert spec.stats.accepted <= spec.stats.drafted


def test_greedy_identical_on_free_form(llm_spec):
    plain, spec = _both(llm_spec, FREE, max_tokens=120)
    assert spec.tokens == plain.tokens


def _diverges_only_at_a_near_tie(session, prompt, plain, spec, config):
    """Identical, or the first difference is a token plain decoding chose by a margin below twice the
    batch noise the session measured (a batch's kernels differ from a single step's; the KV entries a
    batch wrote carry that noise into later steps: docs/runtime.md)."""
    if spec.tokens == plain.tokens:
        return
    i = next(k for k, (a, b) in enumerate(zip(plain.tokens, spec.tokens)) if a != b)
    ctx = prompt + plain.tokens[:i]
    row = penalized(np.asarray(session.logits(ctx)), config, ctx[-config.repeat_last_n:])
    top2 = np.sort(row)[-2:]
    noise = max(session.__dict__["_batch_noise"].values())
    assert top2[1] - top2[0] < 2 * noise, (i, float(top2[1] - top2[0]), noise)


def test_greedy_identical_in_chat_with_repeat_penalty(llm_spec):
    """Penalties take the per-row path of greedy_verify and the backend's window via accept_tokens."""
    msgs = [{"role": "user", "content": f"Please repeat this paragraph word for word: {PASSAGE}"}]
    plain = llm_spec.chat(msgs, max_tokens=120, repeat_penalty=1.15, speculate=False)
    spec = llm_spec.chat(msgs, max_tokens=120, repeat_penalty=1.15, speculate=FORCED)
    assert spec.stats.accepted > 0
    config = SamplerConfig(temperature=0.0, repeat_penalty=1.15)
    _diverges_only_at_a_near_tie(llm_spec, llm_spec.chat_tokens(msgs), plain, spec, config)


def test_kv_cache_after_rejected_drafts_matches_a_fresh_evaluation(llm_spec):
    done = llm_spec.generate(FREE + " " + PASSAGE[:200], max_tokens=60, speculate=FORCED)
    assert done.stats.drafted > done.stats.accepted, done.stats  # some drafts were rejected and truncated
    be = llm_spec.backend
    ctx = list(llm_spec.tokens)
    assert be.n_past == len(ctx)
    assert ctx[-len(done.tokens) + 1:] == done.tokens[:-1]  # every emitted token but the last is in the KV cache
    live = llm_spec.logits(ctx + [done.tokens[-1]])
    llm_spec.reset()
    be.truncate(0)
    be.eval(ctx + [done.tokens[-1]])
    fresh = be.logits()
    be.truncate(0)
    llm_spec.tokens.clear()
    # a batch's numerics differ from single steps' by ~0.6 here; stale or misplaced KV entries by far more
    assert float(np.abs(live - fresh).max()) < 1.5
    assert float((live * fresh).sum() / np.linalg.norm(live) / np.linalg.norm(fresh)) > 0.999


# -- max_tokens, stop strings, streaming -----------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 9, 41])
def test_max_tokens_exact(llm_spec, n):
    plain, spec = _both(llm_spec, GROUNDED, max_tokens=n)
    assert len(spec.tokens) == n == spec.stats.generated_tokens
    assert spec.tokens == plain.tokens and spec.stats.stop_reason == "length"
    assert llm_spec.backend.n_past == len(llm_spec.tokens) == len(llm_spec.tokenize(GROUNDED)) + n - 1


def test_stop_string_inside_an_accepted_draft(llm_spec):
    plain, spec = _both(llm_spec, GROUNDED, max_tokens=160, stop=["Thomas Reed"])
    assert spec.text == plain.text and spec.stats.stop_reason == plain.stats.stop_reason == "stop"
    assert "Thomas" not in spec.text and "1820" in spec.text
    assert spec.stats.accepted > 0
    assert llm_spec.backend.n_past == len(llm_spec.tokens) == len(llm_spec.tokenize(GROUNDED)) + len(spec.tokens) - 1


def test_stream_pieces_are_the_text(llm_spec):
    plain = list(llm_spec.stream(GROUNDED, max_tokens=80, speculate=False))
    stream = llm_spec.stream(GROUNDED, max_tokens=80, speculate=FORCED)
    pieces = list(stream)
    assert "".join(pieces) == "".join(plain) == stream.completion.text
    assert stream.completion.stats.accepted > 0


def test_sampled_generation_with_speculation(llm_spec):
    done = llm_spec.generate(GROUNDED, max_tokens=50, temperature=0.3, repeat_penalty=1.1, seed=3, speculate=FORCED)
    again = llm_spec.generate(GROUNDED, max_tokens=50, temperature=0.3, repeat_penalty=1.1, seed=3, speculate=FORCED)
    assert len(done.tokens) == 50 and done.tokens == again.tokens  # seeded: reproducible
    assert done.stats.drafted > 0  # verified by sampled_verify (this seed's answer summarises: few accepted)


# -- ONNX backend ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_f32_spec(fused_f32_onnx):
    """The fused float32 graph: its batch rows equal single steps (noise ~2e-5), so AUTO turns lookup on."""
    from edgellm import optimize as opt

    assert opt.onnx_available(), "the onnx extra (part of the test extra) is not installed"
    s = edgellm.load(fused_f32_onnx, n_ctx=1024, disk_cache=False, sampler=GREEDY)
    yield s
    s.close()


def test_onnx_greedy_identical_and_drafts_accepted(onnx_f32_spec):
    s = onnx_f32_spec
    assert s.backend.name == "onnxruntime"
    assert s.generate(GROUNDED, max_tokens=40).stats.drafted > 0   # on by default here (exact batches)
    plain, spec = _both(s, GROUNDED, max_tokens=100)
    assert spec.tokens == plain.tokens
    assert spec.stats.accepted >= 40, spec.stats
    plain, spec = _both(s, GROUNDED, max_tokens=100, stop=["Thomas Reed"])
    assert spec.text == plain.text and spec.stats.stop_reason == "stop"
    assert s.backend.n_past == len(s.tokens)


def test_auto_stays_off_where_batches_round_differently(default_model_path):
    """The transcoded int4 graph (int8 kernels, accuracy level 4) rounds a batch row differently from a single
    step, so greedy identity would not be exact: AUTO measures that and decodes plainly."""
    from edgellm import optimize as opt
    from edgellm.speculative_loop import EXACT_NOISE, batch_noise

    decision = opt.cached(default_model_path, "lossless") or opt.optimize(default_model_path, quality="lossless")
    onnx = [c for c in decision.candidates if c.backend == "onnxruntime" and c.excluded is None]
    assert onnx, "the transcoded ONNX form of the default model was not built"
    with edgellm.load(onnx[0].path, n_ctx=1024, disk_cache=False, sampler=GREEDY) as s:
        c = s.generate(GROUNDED, max_tokens=24)
        assert batch_noise(s, 9) > EXACT_NOISE and c.stats.drafted == 0


# -- the acceptance rule, statistically ------------------------------------------------------------
V = 6
ROWS = np.array([[2.0, 1.4, 0.9, 0.3, -0.5, -1.2],
                 [0.1, 1.8, 1.7, -0.4, 0.6, 0.0],
                 [1.0, 0.2, -0.3, 1.5, 0.4, 0.9]], np.float32)
DRAFT = [1, 2]  # p(1) ≈ 0.3 at row 0: accepted about a third of the time
CONFIG = SamplerConfig(temperature=0.9, top_k=5, top_p=1.0, min_p=0.0, repeat_penalty=1.3, repeat_last_n=8)
HISTORY = [0, 3]
DRAWS = 30000
CHI2_CRIT = 25.7  # chi-square, 5 degrees of freedom, p = 0.0001: a correct rule fails once in 10,000 seeds


def _target(row: np.ndarray, window: list[int]) -> np.ndarray:
    ids, p = distribution(penalized(row, CONFIG, window), CONFIG)
    out = np.zeros(V)
    out[ids] = p
    return out


def _chi2(counts: np.ndarray, p: np.ndarray) -> float:
    n = counts.sum()
    keep = p > 0
    assert counts[~keep].sum() == 0, "drew a token the distribution excludes"
    e = n * p[keep]
    return float(((counts[keep] - e) ** 2 / e).sum())


def _emitted(verify, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the first emitted token, and of the second given that the first was the draft's."""
    rng = np.random.default_rng(seed)
    first, second = np.zeros(V, np.int64), np.zeros(V, np.int64)
    for _ in range(DRAWS):
        m, nxt = verify(ROWS, DRAFT, CONFIG, HISTORY, rng)
        seq = [*DRAFT[:m], nxt]
        first[seq[0]] += 1
        if m >= 1:  # the first was the draft's token, accepted: the second follows row 1
            second[seq[1]] += 1
    return first, second


def _rule_holds(verify, seed: int = 11) -> tuple[float, float]:
    first, second = _emitted(verify, seed)
    return _chi2(first, _target(ROWS[0], HISTORY)), _chi2(second, _target(ROWS[1], HISTORY + [DRAFT[0]]))


def test_sampled_verify_keeps_the_distribution():
    p0 = _target(ROWS[0], HISTORY)
    assert 0.15 < p0[DRAFT[0]] < 0.5 and (p0 == 0).sum() == 1  # the case exercises accept, reject and top-k
    c1, c2 = _rule_holds(sampled_verify)
    assert c1 < CHI2_CRIT and c2 < CHI2_CRIT, (c1, c2)


def _always_accept(rows, draft, config, history, rng):
    m, nxt = sampled_verify(rows[len(draft):], [], config, [*history, *draft], rng)
    return len(draft), nxt


def _resample_with_draft(rows, draft, config, history, rng):
    """Accept with p(x), but on rejection draw from p itself (x not removed): x comes out too often."""
    window = list(history)
    for m, x in enumerate(draft):
        ids, p = distribution(penalized(rows[m], config, window), config)
        hit = np.flatnonzero(ids == x)
        if hit.size and rng.random() < p[hit[0]]:
            window.append(x)
            continue
        return m, int(ids[rng.choice(len(ids), p=p)])
    ids, p = distribution(penalized(rows[len(draft)], config, window), config)
    return len(draft), int(ids[rng.choice(len(ids), p=p)])


@pytest.mark.parametrize("broken", [_always_accept, _resample_with_draft])
def test_the_statistical_check_catches_a_broken_rule(broken):
    try:
        c1, c2 = _rule_holds(broken)
    except AssertionError:  # drew outside the support
        return
    assert max(c1, c2) > CHI2_CRIT


def test_greedy_verify_takes_the_longest_agreeing_prefix():
    rows = np.array([[0, 5, 1], [3, 0, 1], [0, 0, 9], [7, 0, 0]], np.float32)
    assert greedy_verify(rows, [1, 0, 2], GREEDY, []) == (3, 0)
    assert greedy_verify(rows, [1, 2, 2], GREEDY, []) == (1, 0)
    assert greedy_verify(rows, [0, 0, 2], GREEDY, []) == (0, 1)
    pen = SamplerConfig(temperature=0.0, repeat_penalty=6.0, repeat_last_n=4)
    assert greedy_verify(rows, [1, 0, 2], pen, [1]) == (0, 2)  # 5/6 < 1: token 1 is penalised away


# -- drafting and the controller -------------------------------------------------------------------
def test_ngram_index_drafts_what_followed_the_last_occurrence():
    idx = NgramIndex([2, 3], [5, 6, 7, 8, 1, 5, 6, 9, 4, 5, 6])
    assert idx.draft(3) == [9, 4, 5]  # the most recent earlier "5 6" was followed by 9
    idx.extend([9])
    assert idx.draft(2) == [4, 5]  # "5 6 9" (3-gram) first
    assert NgramIndex([2], [1, 2, 3]).draft(4) == []


def test_controller_stops_drafting_when_drafts_fail():
    c = Controller(row_cost=0.1, max_draft=8, rate=0.6, memory=0.8, min_gain=1.05)
    assert c.length(8) > 1
    for _ in range(10):
        c.update(1, 0)
    assert c.length(8) == 0
    for _ in range(20):
        c.update(4, 4)
    assert c.length(8) == 8


# -- bad settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(ngram_min=0), dict(ngram_min=4, ngram_max=3), dict(ngram_max=17),
                                dict(max_draft=0), dict(max_draft=65), dict(row_cost=-0.1), dict(prior_rate=1.5),
                                dict(memory=1.0)])
def test_bad_config_is_a_usage_error(kw):
    with pytest.raises(UsageError):
        SpeculationConfig(**kw)


def test_bad_speculate_values_are_usage_errors(llm_spec, default_model_path):
    with pytest.raises(UsageError):
        edgellm.load(default_model_path, speculate="yes")
    with pytest.raises(UsageError):
        llm_spec.generate("Hi", max_tokens=2, speculate=3)
    assert llm_spec.generate("Hi", max_tokens=2, speculate=SpeculationConfig(max_draft=2)).stats.generated_tokens == 2


def test_the_cost_model_follows_this_devices_timings():
    """Verification timings of an AMD EPYC VM (llama.cpp: 1.45 + 0.45·k steps for k drafts, where the constant
    from the project's Intel VM says 1 + 0.30·k) are fitted, so a single draft no longer looks worth it while a
    long one on copying text still does; one stall (or llama.cpp's first batch of a new size) is not believed;
    a cost the user fixed stays fixed."""
    c = Controller(row_cost=0.3, max_draft=8, rate=0.6, memory=0.8, min_gain=1.05)
    assert c.length(8) > 0
    c.observe_batch(4, 1.0)
    assert (c.overhead, c.row_cost) == (0.0, 0.3)        # no plain step timed yet: nothing to compare with
    for _ in range(5):
        c.observe_step(0.010)
    c.observe_batch(4, 0.010 * 12)                        # the first batch: a stall
    assert (c.overhead, c.row_cost) == (0.0, 0.3)
    for k in (1, 2, 3, 4, 5, 6, 7, 8, 1, 8):
        c.observe_batch(k, 0.010 * (1.45 + 0.45 * k))
    assert c.row_cost == pytest.approx(0.45) and c.overhead == pytest.approx(0.45) and c.step_s == 0.010
    assert c.length(8) == 0                              # at a 0.6 acceptance rate nothing pays here
    c.rate = 0.95
    assert c.length(8) == 8 and c.length(1) == 0         # copying text: eight drafts pay, a lone one does not
    fixed = Controller(row_cost=0.1, max_draft=8, rate=0.6, memory=0.8, min_gain=1.05, fixed_cost=True)
    fixed.observe_step(0.010)
    fixed.observe_batch(4, 0.5)
    assert (fixed.overhead, fixed.row_cost) == (0.0, 0.1)


def test_fit_cost_is_theil_sen_with_the_prior():
    from edgellm.speculate import fit_cost

    assert fit_cost([], 0.3) == (0.0, 0.3)
    assert fit_cost([(2, 3.0)], 0.3) == (0.0, 0.3)                  # one timing: the prior
    assert fit_cost([(2, 3.0), (2, 3.2)], 0.3) == pytest.approx((1.4, 0.3))   # same length twice: its overhead
    overhead, slope = fit_cost([(1, 1.5), (3, 2.5), (5, 3.5), (7, 4.5), (2, 20.0)], 0.3)
    assert slope == pytest.approx(0.5) and overhead == pytest.approx(0.0)     # 1 + 0.5·k, one stall ignored


def test_declined_drafts_still_teach_the_acceptance_rate():
    """Where drafting does not pay at the current rate, the tokens decoded plainly are scored against the draft
    that was declined, so a text that copies its input raises the rate until drafting pays again (without it a
    high row cost would stop drafting for good: the rate moved only on verified drafts)."""
    c = Controller(row_cost=0.6, max_draft=8, rate=0.6, memory=0.8, min_gain=1.05)
    assert c.length(8) == 0
    for _ in range(10):
        c.observe_plain(True)
    assert c.rate > 0.85 and c.length(8) > 0
    for _ in range(10):
        c.observe_plain(False)
    assert c.length(8) == 0


def test_a_generation_measures_its_row_cost(llm_spec, monkeypatch):
    """The loop feeds the controller real timings: plain steps give it a step time, each verification batch a
    (drafts, cost in steps) pair, and the cost it drafts by is the fit of those (which may be the prior itself:
    it is one of the slopes). No identity check here: on llama.cpp, whose batch rows are not single steps, what
    is drafted decides which near ties can flip, and with a fitted cost that depends on this device's timings —
    the FORCED tests above check identity with drafting that depends on the text alone."""
    from edgellm import speculate

    seen = []
    real = speculate.Controller.observe_batch

    def spy(self, drafts, seconds):
        real(self, drafts, seconds)
        if self.step_s:
            seen.append((list(self._batches), self._prior_cost, self.step_s, self.overhead, self.row_cost))

    monkeypatch.setattr(speculate.Controller, "observe_batch", spy)
    spec = llm_spec.generate(GROUNDED, speculate=True, max_tokens=120)
    assert spec.stats.drafted > 0 and spec.stats.generated_tokens == 120
    assert seen, "no verification batch was timed against a plain step"
    batches, prior, step_s, overhead, row_cost = seen[-1]
    assert prior == speculate.ROW_COST["llama.cpp"] and 0.001 < step_s < 1.0
    assert batches and all(1 <= k <= 8 and 0.5 < r <= 1 + speculate.MAX_ROW_COST * (k + 1) for k, r in batches)
    assert (overhead, row_cost) == speculate.fit_cost(batches, prior)


def test_drafting_stops_where_batches_yield_less_than_the_model_predicts():
    """Copied runs end together, not token by token: where verification batches keep producing half the tokens the
    acceptance model expects, its guesses are scaled down until drafting stops; where they produce what it
    expects, it drafts as before."""
    def run(share: float) -> Controller:
        c = Controller(row_cost=0.3, max_draft=8, rate=0.9, memory=0.8, min_gain=1.05)
        for _ in range(30):
            if c.length(8):
                c.produced(round(share * c._expected))
        return c

    fresh = Controller(row_cost=0.3, max_draft=8, rate=0.9, memory=0.8, min_gain=1.05)
    honest, optimistic = run(1.0), run(0.5)
    assert fresh.calibration == 1.0 and fresh.length(8) == 5
    assert honest.calibration == pytest.approx(1.0, abs=0.1) and honest.length(8) == 5
    assert optimistic.calibration < 0.6 and optimistic.length(8) < 5
