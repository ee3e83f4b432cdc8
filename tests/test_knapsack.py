"""The mixed-precision allocators against brute force on small cases: GGUF --target-size (converters/mixed.py
`choose`) and ONNX int4-mixed (converters/onnx_quant.py `allocate_bits`) must find the least-cost choice
that fits, every time, and never exceed the budget."""
from __future__ import annotations

import itertools
import random

from edgellm.converters.knapsack import exact_choice
from edgellm.converters.mixed import Option, choose
from edgellm.converters.onnx_quant import BitChoice, allocate_bits, bytes_of

CASES = 600


def _case(seed: int) -> tuple[dict[str, list[Option]], int]:
    rng = random.Random(seed)
    options = {}
    for t in range(rng.randint(2, 5)):
        k = rng.randint(2, 4)
        sizes = sorted(rng.sample(range(10, 200), k))
        costs = sorted((rng.random() * 10 for _ in range(k)), reverse=True)   # bigger is better, as with bits
        options[f"t{t}"] = [Option(f"T{i}", sizes[i], costs[i]) for i in range(k)]
    lo = sum(min(o.bytes for o in v) for v in options.values())
    hi = sum(max(o.bytes for o in v) for v in options.values())
    return options, rng.randint(lo, hi)


def _brute(options: dict[str, list], budget: int, nbytes, cost) -> float:
    return min(sum(cost(o) for o in combo) for combo in itertools.product(*options.values())
               if sum(nbytes(o) for o in combo) <= budget)


def test_target_size_allocator_is_optimal_on_small_cases():
    misses = []
    for seed in range(CASES):
        options, budget = _case(seed)
        sel = choose(options, budget)
        assert sum(o.bytes for o in sel.values()) <= budget, seed
        assert all(sel[n] in options[n] for n in options)
        best = _brute(options, budget, lambda o: o.bytes, lambda o: o.cost)
        if sum(o.cost for o in sel.values()) > best + 1e-9:
            misses.append(seed)
    assert not misses, f"not optimal in {len(misses)} of {CASES} cases, e.g. seed {misses[0]}"


def test_onnx_bit_allocator_is_optimal_on_small_cases():
    layouts = (BitChoice(4, 64), BitChoice(4, 32), BitChoice(8, 64), BitChoice(8, 32))
    misses = []
    for seed in range(CASES // 2):
        rng = random.Random(seed)
        shapes = {f"u{i}": (rng.choice((64, 96, 128)), rng.choice((64, 128, 192))) for i in range(rng.randint(2, 4))}
        errors = {}
        for t in shapes:
            errs = sorted((rng.random() for _ in layouts), reverse=True)   # more bytes, less error (mostly)
            errors[t] = {c: e for c, e in zip(layouts, errs)}
        size = {t: {c: bytes_of(*shapes[t], c) for c in layouts} for t in shapes}
        lo = sum(min(s.values()) for s in size.values())
        hi = sum(max(s.values()) for s in size.values())
        budget = rng.randint(lo, hi)
        choice = allocate_bits(shapes, errors, budget)
        assert sum(size[t][c] for t, c in choice.items()) <= budget, seed
        options = {t: [(size[t][c], errors[t][c]) for c in layouts] for t in shapes}
        best = _brute(options, budget, lambda o: o[0], lambda o: o[1])
        if sum(errors[t][c] for t, c in choice.items()) > best + 1e-12:
            misses.append(seed)
    assert not misses, f"not optimal in {len(misses)} of {CASES // 2} cases, e.g. seed {misses[0]}"


def test_the_heuristic_alone_is_not_enough():
    """Why the exact check exists: the Lagrangian sweep lands on a:small + b:big (55 bytes, cost 10) and no
    upgrade fits the 5 bytes left, while a:big + b:small (60 bytes, cost 9) is the optimum."""
    options = {"a": [Option("small", 10, 10.0), Option("big", 50, 0.0)],
               "b": [Option("small", 10, 9.0), Option("big", 45, 0.0)]}
    sel = choose(options, 60)
    assert {n: o.type for n, o in sel.items()} == {"a": "big", "b": "small"}


def test_exact_choice_fits_in_buckets_and_refuses_what_cannot_fit():
    big = {f"t{i}": [(1_000_003 + i, 5.0), (2_500_017 + 3 * i, 1.0), (4_000_001, 0.1)] for i in range(50)}
    budget = 130_000_000
    pick = exact_choice(big, budget)
    assert pick is not None
    assert sum(big[t][j][0] for t, j in pick.items()) <= budget   # rounded up to buckets: always fits
    assert exact_choice({"a": [(10, 1.0)], "b": [(10, 1.0)]}, 19) is None
    assert exact_choice({}, 5) == {}
