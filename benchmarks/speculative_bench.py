"""Prompt-lookup speculative decoding against plain decoding of the same model, same prompts, same threads:
decode tok/s with speculation on and off, interleaved round by round (the order alternates), on
(i) rewriting a ~500-token passage, (ii) editing a code snippet, (iii) free-form generation; greedy
output identity is checked on every pair. On llama.cpp and, when `edgellm optimize` has a stored ONNX
candidate for the default model, on onnxruntime too. --cost also measures the cost of one extra row in
a verification batch, in single-token steps (ROW_COST in edgellm/speculate.py).

    python benchmarks/speculative_bench.py --threads 2 --rounds 3 --cost  # -> benchmarks/out/speculative_bench.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmeta  # noqa: E402

TARGETS = {"rewrite": 1.5, "code_edit": 1.5, "free_form": 0.97}

PASSAGE = " ".join([
    "The river town of Alder Bend sits where two valleys meet, and for most of its history it has lived by the water.",
    "Every spring the snowmelt swells the river, and the old stone bridge, built in 1820 by a mason named Thomas Reed,",
    "carries farmers, schoolchildren and the weekly mail coach across the flood. The town council has argued for a",
    "decade about whether to replace the bridge with a wider steel span, but the historical society insists that the",
    "arches must stay. Last year a compromise was reached: the old bridge will be kept for walkers and cyclists, and a",
    "new crossing will be built two hundred metres downstream, out of sight of the market square. Work begins in the",
    "autumn, after the harvest festival, when the river is at its lowest and the fields are empty. The contractor, a",
    "family firm from the next valley, has promised to hire local workers and to keep the road open during the day.",
    "Not everyone is pleased. The owners of the riverside cafe fear that the noise will drive away the summer visitors",
    "who come to sit under the chestnut trees, and the fishing club worries about the gravel that will be dug from the",
    "riverbed. At a crowded meeting in the school hall, the mayor listened to both sides for three hours before asking",
    "the engineers to study a quieter method of driving the piles. Their report is due in the spring. Meanwhile the",
    "children of Alder Bend have started a project of their own: they are collecting photographs, letters and stories",
    "about the old bridge, from the day it opened to the great flood of 1952, when the water rose to the top of the",
    "arches and the whole town watched from the hillside, certain that the bridge would fall. It did not. The stones",
    "that Thomas Reed set by hand held firm, and when the water went down the bridge stood as it had always stood,",
    "covered in mud and branches but unbroken. The children plan to print the collection as a small book and sell it",
    "at the harvest festival, with the money going towards a bench on the old bridge, facing upstream, for anyone who",
    "wants to sit and watch the river that the town was built around.",
])
CODE = '''def summarize(orders):
    total = 0
    count = 0
    largest = None
    for order in orders:
        if order.get("status") != "paid":
            continue
        amount = order["amount"]
        total += amount
        count += 1
        if largest is None or amount > largest:
            largest = amount
    average = total / count if count else 0.0
    return {"total": total, "count": count, "largest": largest, "average": average}


def report(orders):
    summary = summarize(orders)
    lines = []
    lines.append("paid orders: %d" % summary["count"])
    lines.append("total: %.2f" % summary["total"])
    lines.append("largest: %s" % summary["largest"])
    lines.append("average: %.2f" % summary["average"])
    return "\\n".join(lines)
'''
TASKS = {
    "rewrite": [{"role": "user", "content": "Rewrite the following passage exactly, keeping every sentence:\n\n"
                 + PASSAGE}],
    "code_edit": [{"role": "user", "content": "Rename the variable `total` to `revenue` everywhere in this code and "
                   "show the whole updated code:\n\n```python\n" + CODE + "```"}],
    "free_form": [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in "
                   "a bottle."}],
}


def _log(msg: str) -> None:
    print(f"[speculative_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sessions(threads: int) -> dict[str, Any]:
    import edgellm
    from edgellm import optimize as opt
    from edgellm import store

    path = store.pull(store.DEFAULT_ALIAS, quiet=True)
    out = {"llama.cpp": edgellm.load(path, threads=threads, n_ctx=2048, disk_cache=False, sampler=edgellm.GREEDY)}
    if opt.onnx_available():
        for quality in ("balanced", "lossless"):
            d = opt.cached(path, quality)
            onnx = [c for c in (d.candidates if d else []) if c.backend == "onnxruntime" and c.excluded is None]
            if onnx:
                best = max(onnx, key=lambda c: c.decode_tps or 0.0)
                out[f"onnxruntime ({best.name})"] = edgellm.load(best.path, threads=threads, n_ctx=2048,
                                                                 disk_cache=False, sampler=edgellm.GREEDY)
                break
        else:
            _log("no stored `edgellm optimize` decision with an ONNX candidate: onnxruntime skipped")
    return out


def row_cost(session, reps: int = 5, max_rows: int = 9) -> dict[str, Any]:
    """Seconds of eval_rows(k) over one single-token step at the same KV depth, per k; cost per extra row."""
    be = session.backend
    ctx = session.tokenize(PASSAGE)
    session.prefill(ctx)
    base = be.n_past
    probe = ctx[-max_rows:]

    def timed(fn) -> float:
        best = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best.append(time.perf_counter() - t0)
            be.truncate(base)
        return statistics.median(best)

    step = timed(lambda: be.eval(probe[:1]))
    ratios = {k: timed(lambda k=k: be.eval_rows(probe[:k])) / step for k in range(2, max_rows + 1)}
    per_row = {k: (r - 1.0) / (k - 1) for k, r in ratios.items()}
    return {"step_ms": round(1000 * step, 3), "batch_over_step": {k: round(v, 3) for k, v in ratios.items()},
            "cost_per_extra_row": {k: round(v, 3) for k, v in per_row.items()},
            "row_cost_median": round(statistics.median(per_row.values()), 3)}


def run(threads: int, rounds: int, n_gen: int, cost: bool, budget_s: float) -> dict[str, Any]:
    t_start = time.perf_counter()
    sessions = _sessions(threads)
    result: dict[str, Any] = {"threads": threads, "rounds": rounds, "max_tokens": n_gen, "backends": {}}
    for name, s in sessions.items():
        _log(f"{name}: warm-up")
        for msgs in TASKS.values():  # prefill caches, the batch-noise probe, page-in
            s.chat(msgs, max_tokens=8, speculate=True)
        tps: dict[str, dict[str, list[float]]] = {t: {"off": [], "on": []} for t in TASKS}
        info: dict[str, dict[str, Any]] = {t: {"identical": True, "drafted": 0, "accepted": 0, "generated": 0}
                                           for t in TASKS}
        done_rounds = 0
        for r in range(rounds):
            share = budget_s * (list(sessions).index(name) + 1) / len(sessions)
            if r and time.perf_counter() - t_start > share:
                _log(f"{name}: time budget spent after {r} round(s)")
                break
            done_rounds += 1
            for task, msgs in TASKS.items():
                done = {}
                for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    c = s.chat(msgs, max_tokens=n_gen, speculate=mode == "on")
                    done[mode] = c
                    tps[task][mode].append(c.stats.decode_tps)
                on = done["on"]
                info[task]["identical"] &= on.tokens == done["off"].tokens
                info[task]["drafted"] += on.stats.drafted
                info[task]["accepted"] += on.stats.accepted
                info[task]["generated"] += on.stats.generated_tokens
            _log(f"{name}: round {r + 1}/{rounds} " + ", ".join(
                f"{t} {statistics.median(v['on']) / statistics.median(v['off']):.2f}x" for t, v in tps.items()))
        figures = {}
        for task, v in tps.items():
            off, on = statistics.median(v["off"]), statistics.median(v["on"])
            figures[task] = {"off_tps": round(off, 1), "on_tps": round(on, 1), "speedup": round(on / off, 3),
                             "target": TARGETS[task], "met": on / off >= TARGETS[task],
                             "greedy_identical": info[task]["identical"],
                             "accepted_per_drafted": round(info[task]["accepted"] / max(1, info[task]["drafted"]), 3),
                             "accepted_share_of_output": round(info[task]["accepted"] / max(1, info[task]["generated"]),
                                                               3),
                             "off_rounds": [round(x, 1) for x in v["off"]], "on_rounds": [round(x, 1) for x in v["on"]]}
        entry: dict[str, Any] = {"rounds_done": done_rounds, "tasks": figures,
                                 "batch_noise": s.__dict__.get("_batch_noise")}
        if cost:
            _log(f"{name}: row cost")
            entry["row_cost"] = row_cost(s)
        result["backends"][name] = entry
        s.close()
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    ap.add_argument("--gen", type=int, default=128, help="tokens generated per answer (default 128)")
    ap.add_argument("--cost", action="store_true", help="also measure the cost of an extra verification row")
    ap.add_argument("--budget-s", type=float, default=300,
                    help="stop adding rounds past this many seconds (at least one round runs; default 300)")
    ap.add_argument("--out", type=Path, default=benchmeta.out_path("speculative_bench"),
                    help="write the JSON to this file (default benchmarks/out/speculative_bench.json)")
    args = ap.parse_args(argv)
    benchmeta.start()
    result = run(args.threads, args.rounds, args.gen, args.cost, args.budget_s)
    print(benchmeta.save(result, args.out, "speculative_bench.py", argv))


if __name__ == "__main__":
    main()
