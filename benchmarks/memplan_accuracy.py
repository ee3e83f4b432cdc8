"""The memory planner against measured peak RSS: for each context size, a fresh process loads the
default model, fills the context with a long prompt (the full compute working set), generates a few
tokens, then answers a different short prompt (the session stashes the long context: one snapshot),
and reports its peak RSS (VmHWM). Prints JSON: estimate / measured per context, and the target
(|ratio - 1| ≤ 0.15 at every context).

    python benchmarks/memplan_accuracy.py --ctx 2048 8192
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TOLERANCE = 0.15

CHILD = r"""
import json, sys
import edgellm
from edgellm.texts import heldout_text
model, n_ctx, kv_type = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
s = edgellm.load(model, n_ctx=n_ctx, kv_type=kv_type, disk_cache=False, sampler=edgellm.GREEDY)
after_load = hwm()
text = heldout_text()
tokens = s.tokenize(text * (1 + 4 * n_ctx // max(1, len(s.tokenize(text)))))[:s.n_ctx - 40]
long = s.generate(s.detokenize(tokens), max_tokens=16)
short = s.generate('The capital of France is', max_tokens=8)
print(json.dumps({"after_load": after_load, "peak": hwm(), "prompt_tokens": long.stats.prompt_tokens,
                  "n_ctx": s.n_ctx}))
"""


def measure(model: Path, n_ctx: int, kv_type: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(n_ctx), kv_type], check=True,
                         capture_output=True, text=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(model: Path, contexts: list[int], kv_type: str = "f16") -> dict:
    from edgellm import memplan

    rows = []
    for n_ctx in contexts:
        est = memplan.estimate(model, n_ctx, kv_type)
        got = measure(model, n_ctx, kv_type)
        ratio = est.total_bytes / got["peak"]
        rows.append({"n_ctx": n_ctx, "kv_type": kv_type, "estimate_mib": round(est.total_bytes / 2**20, 1),
                     "measured_peak_mib": round(got["peak"] / 2**20, 1),
                     "measured_after_load_mib": round(got["after_load"] / 2**20, 1),
                     "ratio": round(ratio, 3), "within_tolerance": abs(ratio - 1) <= TOLERANCE,
                     "parts_mib": {k: round(v / 2**20, 1) for k, v in est.parts().items()},
                     "prompt_tokens": got["prompt_tokens"]})
    return {"model": model.name, "tolerance": TOLERANCE, "rows": rows,
            "target_met": all(r["within_tolerance"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path or store alias [default: the embedded model]")
    ap.add_argument("--ctx", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--kv-type", default="f16")
    args = ap.parse_args()
    from edgellm import store

    model = store.resolve(args.model).path if args.model else store.pull(quiet=True)
    print(json.dumps(run(Path(model), args.ctx, args.kv_type), indent=2))


if __name__ == "__main__":
    main()
