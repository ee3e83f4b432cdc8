"""Prompt-lookup speculative decoding, written once above every backend.

A draft is what followed the most recent earlier occurrence of the context's last n-gram (prompt,
history and answer so far): rewriting, summarising or editing a text copies long runs of it, and
those runs cost one batched evaluation instead of one evaluation per token. The draft and the
token before it are evaluated in one batch with logits for every position; the longest prefix the
model agrees with is kept and the KV cache is truncated back over the rest.

Greedy: a draft token is accepted when it is the argmax of its row, so the text is the one plain
decoding gives from the same logits. With sampling, a deterministic draft x is accepted with
probability p(x) under the full processed distribution (repeat penalty, top-k, top-p, min-p,
temperature: runtimes/sampling.py, the same chain as llama.cpp's); a rejected position samples from
p with x removed and renormalised, and a fully accepted draft samples one more token from the last
row. Each emitted token then has exactly p's distribution (the standard speculative-sampling rule
for a point-mass draft).

When it pays (a measured rule, see docs/runtime.md): a step drafts only when the context holds a
match for its last n-gram, and only as many tokens as the expected gain justifies. Verifying k
drafts costs about 1 + overhead + row_cost·k single steps; with a per-token acceptance rate a (tracked
over recent drafts, and scored against plain tokens while nothing is drafted) a step yields
1 + a + … + a^k tokens on average, scaled by how far batches have met that prediction, so the draft
length maximising tokens per unit of cost is used, and none when no length beats 1. The cost starts from
the backend's figure measured on this project's machine (ROW_COST) and is then fitted to what this
device's verification batches and plain steps take (Controller.observe_*, fit_cost): on another CPU the
first row cost 0.9 of a step and each further one 0.45 where the constant said 0.30, and drafting with the
constant made grounded answers slower than plain decoding.
"""
from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from .errors import UsageError
from .runtimes.base import SamplerConfig
from .runtimes.sampling import distribution, penalized

# Cost of one extra draft row in a verification batch, in units of a single-token step, measured with
# `python benchmarks/speculative_bench.py --cost` (median over batches of 2-9 rows, SmolLM2-135M, 2 threads, this
# project's 2-core AVX-512 x86 VM, quiet, 2026-12-06): llama.cpp Q4_1 0.30 (0.43-0.58 under load), onnxruntime's
# transcoded graph 0.16 (0.03 while its Q4_1 blocks ran on MatMulNBits' float path, before transcode format 2).
# A larger, more bandwidth-bound model makes rows cheaper.
ROW_COST = {"llama.cpp": 0.30, "onnxruntime": 0.16}
DEFAULT_ROW_COST = 0.15
CALIBRATION_PRIOR = 8.0   # tokens of agreement between the acceptance model and drafting's yield assumed at first
COST_WINDOW = 12    # recent timings the step time (a median) and the cost model (a fit) follow
MAX_ROW_COST = 2.0  # a row cost beyond this is a stall, not the kernel's cost; it is clipped


@dataclass(frozen=True)
class SpeculationConfig:
    """Prompt-lookup drafting settings (the defaults are what `edgellm.load` uses)."""

    enabled: bool = True
    auto: bool = False  # on only where batched rows equal single steps (EXACT_BATCHES): load()'s default
    ngram_max: int = 3  # the longest suffix n-gram looked up (longer matches first)
    ngram_min: int = 2  # the shortest; single tokens match too often to predict much
    max_draft: int = 8  # tokens per verification batch at most
    row_cost: float | None = None  # None: the backend's ROW_COST, then what this device's batches take
    prior_rate: float = 0.6  # acceptance rate assumed before any draft was verified
    memory: float = 0.8  # weight of the past in the running acceptance rate (per verified draft token)
    min_gain: float = 1.05  # draft only where the expected tokens per unit of cost beat plain decoding by this

    def __post_init__(self) -> None:
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            raise UsageError("speculation n-gram sizes must satisfy 1 ≤ ngram_min ≤ ngram_max ≤ 16")
        if not 1 <= self.max_draft <= 64:
            raise UsageError("speculation max_draft must be in 1..64")
        if self.row_cost is not None and self.row_cost < 0:
            raise UsageError("speculation row_cost must be ≥ 0")
        if not 0 <= self.prior_rate <= 1 or not 0 <= self.memory < 1:
            raise UsageError("speculation prior_rate must be in [0, 1] and memory in [0, 1)")


OFF = SpeculationConfig(enabled=False)
AUTO = SpeculationConfig(auto=True)
# Backends whose verification batches give the logits single steps give (max |delta logit| measured on the default
# model: onnxruntime's fused graph 6e-5; llama.cpp 0.6-0.9, its CPU kernels change with the batch size). Only there
# is prompt lookup on by default: elsewhere a near-tie can flip a greedy token, and answers would depend on drafting.
EXACT_BATCHES = frozenset({"onnxruntime"})


def speculation_from(value: bool | SpeculationConfig | None) -> SpeculationConfig:
    """None: AUTO (on for EXACT_BATCHES backends); True: on; False: off; or the given settings."""
    if value is None:
        return AUTO
    if value is True:
        return SpeculationConfig()
    if value is False:
        return OFF
    if isinstance(value, SpeculationConfig):
        return value
    raise UsageError(f"speculate must be True, False or a SpeculationConfig, not {type(value).__name__}")


class NgramIndex:
    """Where each n-gram of the context last occurred, kept up to date token by token.

    Maps an n-gram to the index of the token that followed its most recent occurrence, so a lookup
    is a dict probe rather than a scan of the context (transformers' and llama.cpp's prompt lookup
    scan; hand-written here because the index must grow with every accepted token).
    """

    def __init__(self, sizes: Sequence[int], tokens: Sequence[int] = ()) -> None:
        self.sizes = sorted(set(sizes), reverse=True)
        self.tokens: list[int] = []
        self._maps: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for tok in tokens:
            self.tokens.append(tok)
            end = len(self.tokens) - 1  # the n-grams ending just before `tok` are followed by it
            for n in self.sizes:
                if end >= n:
                    self._maps[n][tuple(self.tokens[end - n:end])] = end

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the most recent earlier occurrence of the longest
        matching suffix n-gram; [] when the context holds none."""
        toks, size = self.tokens, len(self.tokens)
        for n in self.sizes:
            if size < n:
                continue
            start = self._maps[n].get(tuple(toks[size - n:]))
            if start is not None:
                return toks[start:start + limit]
        return []


@dataclass
class Controller:
    """The draft length that maximises expected tokens per unit of cost, from the running acceptance rate
    and (unless `fixed_cost`) the running cost of a draft row on this device."""

    row_cost: float
    max_draft: int
    rate: float
    memory: float
    min_gain: float
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    _best: dict[float, int] = field(default_factory=dict)
    fixed_cost: bool = False
    step_s: float | None = None   # running median wall time of a plain decode step here
    overhead: float = 0.0         # a verification batch's fixed cost beyond one step (switching to batch kernels)
    _steps: deque = field(default_factory=lambda: deque(maxlen=COST_WINDOW))
    _batches: deque = field(default_factory=lambda: deque(maxlen=COST_WINDOW))
    _prior_cost: float | None = None
    _expected: float = 0.0        # the acceptance model's expected tokens for the length last chosen
    _predicted: float = 0.0
    _produced: float = 0.0

    def observe_step(self, seconds: float) -> None:
        """A plain step's wall time (evaluate one token, sample): the unit verification costs are measured in."""
        if seconds > 0:
            self._steps.append(seconds)
            self.step_s = statistics.median(self._steps)

    def observe_batch(self, drafts: int, seconds: float) -> None:
        """A verification of `drafts` tokens took `seconds` (batch, verify, truncate), in plain steps: refit the
        cost model 1 + overhead + row_cost·k to the recent ones (fit_cost). Why two terms: on one CPU the first
        draft row costs 0.9 of a step and each further one 0.45 (llama.cpp leaving its one-token kernels), on
        another 0.4 and 0.37; one slope cannot say both 'a single draft does not pay' and 'eight do'."""
        if self.fixed_cost or not self.step_s or drafts < 1:
            return
        if self._prior_cost is None:
            self._prior_cost = self.row_cost
        self._batches.append((drafts, min(seconds / self.step_s, 1.0 + MAX_ROW_COST * (drafts + 1))))
        self.overhead, self.row_cost = fit_cost(self._batches, self._prior_cost)

    def observe_plain(self, hit: bool) -> None:
        """A plainly decoded token did (not) equal the first token of the draft declined before it: one more
        observation of the acceptance rate (greedy: exactly acceptance; sampled: equal with probability p(x),
        the acceptance rule's own). Why: the rate otherwise moves only when drafts are verified, so a cost that
        stops drafting at the prior rate would stop it for good, even on text that copies its input."""
        self.rate = self.memory * self.rate + (1.0 - self.memory) * float(hit)

    def length(self, available: int) -> int:
        """How many of `available` draft tokens to verify (0: decode one token plainly)."""
        best_k, best_gain, self._expected = 0, self.min_gain, 0.0
        a, c = self.rate, self.row_cost
        expected, term = 1.0, 1.0
        for k in range(1, min(available, self.max_draft) + 1):
            term *= a
            expected += term
            gain = self.calibration * expected / (1.0 + self.overhead + c * k)
            if gain > best_gain:
                best_k, best_gain, self._expected = k, gain, expected
        return best_k

    @property
    def calibration(self) -> float:
        """Tokens verification batches produced over what the acceptance model predicted for them, with
        CALIBRATION_PRIOR tokens of agreement assumed. Why: runs of a copied text end together, not one token at a
        time as the geometric model has it, and the model's guess is checked against what drafting yields here."""
        return (self._produced + CALIBRATION_PRIOR) / (self._predicted + CALIBRATION_PRIOR)

    def produced(self, tokens: int) -> None:
        """The last verification batch (of the length `length` chose) gave `tokens` tokens."""
        if self._expected:
            self._predicted += self._expected
            self._produced += tokens

    def update(self, drafted: int, accepted: int) -> None:
        """Fold a verified draft into the rate: each draft position up to the first rejection is one
        Bernoulli observation (positions after it were never tested)."""
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        observed = accepted + (1 if accepted < drafted else 0)
        for i in range(observed):
            hit = 1.0 if i < accepted else 0.0
            self.rate = self.memory * self.rate + (1.0 - self.memory) * hit


def fit_cost(batches: Sequence[tuple[int, float]], prior_row_cost: float) -> tuple[float, float]:
    """(overhead, row cost) of cost(k) = 1 + overhead + row_cost·k from verification timings (k drafts, cost in
    plain steps): Theil–Sen — the lower median of the slopes between pairs of different lengths, then of the
    intercepts — with the prior (no overhead, `prior_row_cost`) among them, so one stall (llama.cpp's first
    batch of a new size allocates its graph; another process) is not believed and two consistent timings are.
    Hand-written: ten lines where scipy.stats.theilslopes would bring scipy into the runtime."""
    slopes = [(r2 - r1) / (k2 - k1) for (k1, r1), (k2, r2) in combinations(batches, 2) if k1 != k2]
    slope = min(max(statistics.median_low([prior_row_cost, *slopes]), 0.0), MAX_ROW_COST)
    overhead = statistics.median_low([0.0, *(r - 1.0 - slope * k for k, r in batches)])
    return max(overhead, 0.0), slope


def greedy_verify(rows: np.ndarray, draft: Sequence[int], config: SamplerConfig,
                  history: Sequence[int], guard: float = 0.0) -> tuple[int, int | None]:
    """(accepted draft tokens, the next token) for greedy decoding: the model's argmax per row.

    guard > 0: a row whose best logit leads the runner-up by less than `guard` is too close to call
    from a batch (its kernels differ from a single step's by up to the measured noise): stop there
    and return (rows decided so far, None), so the token is decided by a single step instead.
    """
    if config.repeat_penalty == 1.0 and guard <= 0.0:
        picks = rows.argmax(axis=1)
        m = 0
        while m < len(draft) and picks[m] == draft[m]:
            m += 1
        return m, int(picks[m])
    window = list(history)
    for m in range(len(draft) + 1):
        row = penalized(rows[m], config, window) if config.repeat_penalty != 1.0 else rows[m]
        pick = int(row.argmax())
        if guard > 0.0:
            top2 = np.partition(row, -2)[-2:]
            if float(top2[1] - top2[0]) < guard:
                return m, None
        if m == len(draft) or pick != draft[m]:
            return m, pick
        window.append(pick)
    raise AssertionError("unreachable")


def sampled_verify(rows: np.ndarray, draft: Sequence[int], config: SamplerConfig, history: Sequence[int],
                   rng: np.random.Generator) -> tuple[int, int]:
    """(accepted draft tokens, the next token) under the speculative acceptance rule for a draft that
    proposes x with certainty: accept with probability p(x), else draw from p without x."""
    window = list(history)
    for m in range(len(draft) + 1):
        ids, p = distribution(penalized(rows[m], config, window), config)
        if m == len(draft):
            return m, int(ids[rng.choice(len(ids), p=p)])
        x = draft[m]
        hit = np.flatnonzero(ids == x)
        px = float(p[hit[0]]) if hit.size else 0.0
        if px > 0.0 and rng.random() < px:
            window.append(x)
            continue
        if hit.size:
            p = p.copy()
            p[hit[0]] = 0.0
            total = p.sum()
            if total <= 0.0:  # x held all the mass (then it was accepted above): unreachable but safe
                return m, x
            p /= total
        return m, int(ids[rng.choice(len(ids), p=p)])
    raise AssertionError("unreachable")


class Speculator:
    """One generation's drafting state: the n-gram index over its context, the controller, the RNG."""

    def __init__(self, settings: SpeculationConfig, backend_name: str, context: Sequence[int],
                 sampler: SamplerConfig) -> None:
        self.settings = settings
        self.index = NgramIndex(range(settings.ngram_min, settings.ngram_max + 1), context)
        # each generation starts from the prior figures and fits them again within a dozen batches: its text
        # (what it copies) and the machine's load are its own
        fixed = settings.row_cost is not None
        cost = settings.row_cost if fixed else ROW_COST.get(backend_name, DEFAULT_ROW_COST)
        self.control = Controller(cost, settings.max_draft, settings.prior_rate, settings.memory, settings.min_gain,
                                  fixed_cost=fixed)
        self.declined: int | None = None   # the first token of the draft the controller just declined
        self.sampler = sampler
        self.rng = np.random.default_rng(sampler.seed)

    def draft(self, limit: int | None = None) -> list[int]:
        """The tokens to verify after the context's last token, at most `limit` ([] to decode plainly)."""
        tokens = self.index.draft(min(self.settings.max_draft, limit if limit is not None else self.settings.max_draft))
        k = self.control.length(len(tokens)) if tokens else 0
        self.declined = tokens[0] if tokens and not k else None
        return tokens[:k]

    def plain(self, token: int) -> None:
        """A token decoded plainly: scored against the draft declined for its position, if any."""
        if self.declined is not None:
            self.control.observe_plain(token == self.declined)
            self.declined = None

    def verify(self, rows: np.ndarray, draft: Sequence[int], guard: float = 0.0) -> tuple[int, int | None]:
        """Rows are the logits after the context's last token and after each draft token; the next
        token is None where greedy_verify's guard left it to a single step."""
        c = self.sampler
        history = self.index.tokens[-c.repeat_last_n:] if c.repeat_penalty != 1.0 and c.repeat_last_n else []
        if c.greedy:
            m, nxt = greedy_verify(rows, draft, c, history, guard)
        else:
            m, nxt = sampled_verify(rows, draft, c, history, self.rng)
        # a close call left to a single step (nxt None) ends what this batch could use as surely as a rejection:
        # counted as one, so the rate is the share of drafts a batch turns into tokens (counted as accepted, it
        # read 1.0 on llama.cpp while half the drafted rows were thrown away, and drafting ran at 0.89x)
        self.control.update(len(draft), m)
        self.control.produced(m + (nxt is not None))
        return m, nxt
