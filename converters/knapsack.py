"""Exact multiple-choice knapsack: one option per item, least summed cost, summed bytes within a budget.

The mixed-precision allocators (converters/mixed.py for GGUF --target-size, converters/onnx_quant.py for
ONNX int4-mixed) first run a fast heuristic (a Lagrangian sweep or a greedy by cost per byte), which can
miss the optimum by a lot on small problems (one upgrade that does not fit blocks a better pair). This
dynamic programme over the byte budget is the check: its byte counts are rounded *up* to buckets of
budget / MAX_BUCKETS bytes, so whatever it picks really fits, and with budgets of at most MAX_BUCKETS
bytes (every small case) it is exact. The allocators keep whichever of the two costs less.

Hand-written: scipy's milp would do it with an integer solver dependency the runtime does not have, and
the problem is small (a few hundred items, a dozen options each).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

MAX_BUCKETS = 1 << 15


def exact_choice(items: Mapping[str, Sequence[tuple[int, float]]], budget: int,
                 max_buckets: int = MAX_BUCKETS) -> dict[str, int] | None:
    """For each item, the index of its chosen (bytes, cost) option, minimising the summed cost with summed
    bytes ≤ budget; None when even the smallest options do not fit (in buckets)."""
    if budget < 0 or not items:
        return {} if budget >= 0 else None
    bucket = max(1, math.ceil(budget / max_buckets))
    cap = budget // bucket
    names = list(items)
    best = np.zeros(cap + 1)            # least cost of the items so far within c buckets (0 before any item)
    picks = np.zeros((len(names), cap + 1), np.int16)
    for i, name in enumerate(names):
        new = np.full(cap + 1, np.inf)
        for j, (nbytes, cost) in enumerate(items[name]):
            w = math.ceil(nbytes / bucket)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[:cap + 1 - w] + cost
            better = cand < new
            new[better], picks[i, better] = cand[better], j
        best = new
    if not np.isfinite(best[cap]):
        return None
    out, c = {}, cap
    for i in range(len(names) - 1, -1, -1):
        j = int(picks[i, c])
        out[names[i]] = j
        c -= math.ceil(items[names[i]][j][0] / bucket)
    return out
