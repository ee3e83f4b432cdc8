"""Size-targeted mixed precision: one llama.cpp type per tensor, chosen to lose the least under a byte budget.

For every candidate type the whole model is quantized once by llama.cpp (pure mode, with the importance
matrix), so each tensor's real quantization error δ for that type is known. Its cost is the predicted
rise in KL divergence, ½ Σ F δ² per token, with F the diagonal Fisher (converters/sensitivity.py).
Picking one option per tensor to minimise the summed cost under the budget is a multiple-choice
knapsack, solved by a Lagrangian sweep plus a greedy fill of the leftover bytes (hand-written: no
library here does it). The chosen types go back to llama.cpp's quantizer as exact per-tensor overrides,
and the recipe is saved next to the model so the choice can be read, reviewed and reapplied.

With the calibration Gram matrices (`grams`), every type edgellm can write itself (converters/gguf_blocks.py)
is offered a second time with GPTQ rounding, beside llama.cpp's, at the same bytes. GPTQ's errors are
correlated across a row on purpose (they cancel in x·w), which a diagonal Fisher cannot see, so then every
option of a tensor with a Gram is costed by the Kronecker-factored Fisher ½ Σ_i a_i e_i H e_iᵀ per token
(a_i: row i's mean squared output gradient, from the Fisher's row sums; H: the mean x xᵀ of its input),
which equals the diagonal cost for uncorrelated errors. The recipe lists the tensors whose blocks GPTQ
writes; they are patched into llama.cpp's output (converters/gguf_gptq.py).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgellm.errors import InvalidModelError, UsageError

from .checkpoint import Checkpoint, gguf_tensor_names
from .knapsack import exact_choice

# ggml type -> the llama.cpp file type whose pure run (every tensor the same type) yields it. 256-wide
# K/IQ blocks only fit rows that are multiples of 256; llama.cpp falls back elsewhere and such results
# are simply not offered for those tensors (the fallback type is measured in its own run).
CANDIDATES: dict[str, str] = {"Q3_K": "Q3_K_S", "IQ4_XS": "IQ4_XS", "Q4_0": "Q4_0", "IQ4_NL": "IQ4_NL",
                              "Q4_K": "Q4_K_S", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_K": "Q5_K_S", "Q5_1": "Q5_1",
                              "Q6_K": "Q6_K", "Q8_0": "Q8_0"}
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Option:
    type: str
    bytes: int
    cost: float      # predicted mean KL divergence added per token
    rounding: str = "llama.cpp"    # or "gptq": edgellm's error-compensated blocks of the same type and size


@dataclass
class Recipe:
    """What --target-size chose, saved as JSON beside the model (`edgellm convert --recipe` reapplies it)."""
    budget_bytes: int
    overhead_bytes: int                       # metadata, 1-D tensors, alignment: not quantizable
    tensor_bytes: int
    predicted_kld: float
    types: dict[str, str]                     # GGUF tensor name -> ggml type
    sensitivity_tokens: int = 0
    label: str = ""                           # the llama.cpp file type written into general.file_type
    options: dict[str, list[list]] = field(default_factory=dict)   # name -> [[type, bytes, cost, rounding], ...]
    gptq: list[str] = field(default_factory=list)                  # tensors whose blocks edgellm's GPTQ writes

    @property
    def total_bytes(self) -> int:
        return self.overhead_bytes + self.tensor_bytes

    def histogram(self) -> dict[str, int]:
        """Tensor count per type; GPTQ-rounded ones as e.g. "Q4_0+gptq"."""
        out: dict[str, int] = {}
        gptq = set(self.gptq)
        for n, t in self.types.items():
            key = f"{t}+gptq" if n in gptq else t
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def save(self, path: str | os.PathLike[str]) -> Path:
        from edgellm.atomic import write_atomic
        path = Path(path)
        write_atomic(path, (json.dumps(asdict(self), indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recipe:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UsageError(f"{path} is not an edgellm recipe ({e})") from None


def recipe_path(model: str | os.PathLike[str]) -> Path:
    """model.gguf -> model.recipe.json"""
    p = Path(model)
    return p.with_name(p.name.removesuffix(".gguf") + ".recipe.json")


def choose(options: Mapping[str, list[Option]], budget: int) -> dict[str, Option]:
    """One option per tensor minimising the summed cost with summed bytes ≤ budget (the smallest must fit).

    The Lagrangian relaxation (min cost + λ·bytes per tensor, λ bisected) lands on the cost/size hull;
    the bytes it leaves unused go greedily to the upgrades that buy the most cost per byte. An exact
    dynamic programme over the budget (bytes in buckets, rounded up) runs beside it; the cheaper wins.
    """
    def pick(lam: float) -> dict[str, Option]:
        return {n: min(opts, key=lambda o: (o.cost + lam * o.bytes, o.bytes)) for n, opts in options.items()}

    def size(sel: Mapping[str, Option]) -> int:
        return sum(o.bytes for o in sel.values())

    smallest = {n: min(opts, key=lambda o: (o.bytes, o.cost)) for n, opts in options.items()}
    if size(smallest) > budget:
        raise UsageError("budget below the smallest mix")   # callers check first and say it with numbers
    if size(pick(0.0)) <= budget:
        sel = pick(0.0)
    else:
        lo, hi = 0.0, 1e-12
        while size(pick(hi)) > budget and hi < 1e6:
            hi *= 4
        sel = pick(hi) if size(pick(hi)) <= budget else smallest
        for _ in range(100):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 4
            if size(pick(mid)) <= budget:
                hi, sel = mid, pick(mid)
            else:
                lo = mid
            if hi - lo <= 1e-9 * hi:
                break
    sel = _fill(options, sel, budget - size(sel))
    # the relaxation can miss the optimum where one upgrade blocks a better pair: an exact dynamic programme
    # over the bytes (converters/knapsack.py) is the check, and the cheaper of the two wins
    exact = exact_choice({n: [(o.bytes, o.cost) for o in opts] for n, opts in options.items()}, budget)
    if exact is not None:
        alt = {n: options[n][j] for n, j in exact.items()}
        alt = _fill(options, alt, budget - size(alt))
        if sum(o.cost for o in alt.values()) < sum(o.cost for o in sel.values()):
            sel = alt
    return sel


def _fill(options: Mapping[str, list[Option]], sel: dict[str, Option], slack: int) -> dict[str, Option]:
    """Spend `slack` bytes greedily on the upgrades that buy the most cost per byte."""
    while True:
        best, gain = None, 0.0
        for n, cur in sel.items():
            for o in options[n]:
                extra = o.bytes - cur.bytes
                if 0 < extra <= slack and o.cost < cur.cost and (cur.cost - o.cost) / extra > gain:
                    best, gain = (n, o), (cur.cost - o.cost) / extra
        if best is None:
            return sel
        slack -= best[1].bytes - sel[best[0]].bytes
        sel[best[0]] = best[1]


def measure_options(ckpt: Checkpoint, ref_gguf: Path, fisher: Mapping[str, np.ndarray], n_tokens: int,
                    imatrix: Mapping[str, np.ndarray] | None, workdir: Path, *,
                    types: tuple[str, ...] = tuple(CANDIDATES), threads: int | None = None,
                    progress: Progress | None = None,
                    grams: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, list[Option]], int]:
    """Each quantizable tensor's options (real bytes, predicted KLD cost) and the file's fixed overhead.
    With `grams`: GPTQ options too, and Kronecker-factored costs for every tensor that has a Gram."""
    from edgellm.gguf_check import validate_gguf

    from .gguf_source import read_gguf
    from .quantize import quantize

    to_gguf = gguf_tensor_names(ckpt.config)
    weights = {to_gguf[n]: n for n in fisher}
    files: dict[str, tuple[Checkpoint, dict[str, tuple[str, int]]]] = {}
    overhead = 0
    for i, t in enumerate(types):
        if progress:
            progress("quantize candidates", i, len(types))
        dest = workdir / f"candidate-{t}.gguf"
        quantize(ref_gguf, dest, CANDIDATES[t], threads=threads, imatrix=imatrix, pure=True)
        info = validate_gguf(dest)
        table = {x.name: (x.type_name, x.n_bytes) for x in info.tensors}
        missing = sorted(set(weights) - set(table))
        if missing:
            raise InvalidModelError(f"{ref_gguf}: tensor {missing[0]} missing after quantization")
        overhead = info.file_size - sum(table[n][1] for n in weights) + info.alignment * len(info.tensors)
        files[t] = (read_gguf(dest), table)
    if progress:
        progress("quantize candidates", len(types), len(types))
    kfac = _row_weights(ckpt, fisher, n_tokens, grams) if grams else {}
    options: dict[str, list[Option]] = {}
    for i, (name, hf) in enumerate(sorted(weights.items())):
        ref = np.asarray(ckpt.tensors.load(hf), np.float32)
        f = fisher[hf]
        opts = []
        for t, (cand, table) in files.items():
            got, nbytes = table[name]
            if got != t:          # llama.cpp fell back: the fallback type has its own run
                continue
            values = cand.tensors.load(hf)
            if name in kfac:
                cost = _kfac_cost(ref, values, *kfac[name])
            else:
                delta = values - ref
                cost = float(0.5 * np.einsum("ij,ij->", f, delta * delta) / n_tokens)
            opts.append(Option(t, nbytes, cost))
        if not opts:
            raise InvalidModelError(f"no candidate type fits tensor {name} (shape {list(ref.shape)})")
        options[name] = opts
        if progress:
            progress("measure errors", i + 1, len(weights))
    if kfac:
        _add_gptq_options(ckpt, options, weights, kfac, grams, threads, progress)
    return options, overhead


def _row_weights(ckpt: Checkpoint, fisher: Mapping[str, np.ndarray], n_tokens: int,
                 grams: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GGUF name -> (a, H) for the Kronecker-factored cost: F_ij ≈ n · a_i · H_jj gives a_i = Σ_j F_ij / (n · tr H)."""
    from .gguf_gptq import gram_key

    to_gguf = gguf_tensor_names(ckpt.config)
    out = {}
    for hf, f in fisher.items():
        key = gram_key(ckpt.config, hf)
        if key is None or key not in grams:
            continue
        h = grams[key]
        out[to_gguf[hf]] = (f.sum(1) / (n_tokens * max(float(np.trace(h)), 1e-30)), h)
    return out


def _kfac_cost(ref: np.ndarray, values: np.ndarray, a: np.ndarray, h: np.ndarray) -> float:
    from .gptq import values_error

    return 0.5 * values_error(ref, values, h, row_weight=a)


def _add_gptq_options(ckpt: Checkpoint, options: dict[str, list[Option]], weights: Mapping[str, str],
                      kfac: Mapping[str, tuple[np.ndarray, np.ndarray]], grams: Mapping[str, np.ndarray],
                      threads: int | None, progress: Progress | None) -> None:
    """For each type llama.cpp offered a tensor that GPTQ can also write: the GPTQ option, same bytes."""
    from .gguf_blocks import GPTQ_TYPES
    from .gguf_gptq import gptq_many

    jobs = [(name, o) for name in sorted(kfac) for o in options[name] if o.type in GPTQ_TYPES]
    for t in sorted({o.type for _, o in jobs}):
        batch = {name: o for name, o in jobs if o.type == t}
        done = gptq_many(ckpt, grams, {name: (weights[name], t) for name in batch}, threads=threads,
                         progress=None if progress is None else (lambda d, n, t=t: progress(f"gptq {t}", d, n)))
        for name, b in done.items():
            ref = np.asarray(ckpt.tensors.load(weights[name]), np.float32)
            options[name].append(Option(t, batch[name].bytes, _kfac_cost(ref, b.values, *kfac[name]), "gptq"))


def plan(options: Mapping[str, list[Option]], overhead: int, budget_bytes: int, sensitivity_tokens: int) -> Recipe:
    """The recipe for `budget_bytes` (whole file), or a one-line refusal saying what sizes are possible."""
    from edgellm.sizes import human_bytes

    lo = overhead + sum(min(o.bytes for o in opts) for opts in options.values())
    hi = overhead + sum(max(o.bytes for o in opts) for opts in options.values())
    if budget_bytes < lo:
        raise UsageError(f"target size {human_bytes(budget_bytes)} is below the smallest mix of llama.cpp types "
                         f"for this model ({human_bytes(lo)}); "
                         f"possible targets: {human_bytes(lo)} to {human_bytes(hi)}")
    sel = choose(options, budget_bytes - overhead)
    by_type: dict[str, int] = {}
    for o in sel.values():
        by_type[o.type] = by_type.get(o.type, 0) + o.bytes
    label = CANDIDATES[max(by_type, key=by_type.get)]
    return Recipe(budget_bytes=budget_bytes, overhead_bytes=overhead, tensor_bytes=sum(o.bytes for o in sel.values()),
                  predicted_kld=sum(o.cost for o in sel.values()), types={n: o.type for n, o in sorted(sel.items())},
                  sensitivity_tokens=sensitivity_tokens, label=label,
                  options={n: [[o.type, o.bytes, o.cost, o.rounding] for o in opts]
                           for n, opts in sorted(options.items())},
                  gptq=sorted(n for n, o in sel.items() if o.rounding == "gptq"))


def check_recipe(recipe: Recipe, ckpt: Checkpoint) -> None:
    """A saved recipe names exactly this model's 2-D tensors with known types."""
    shapes = ckpt.tensors.shapes
    want = {g for h, g in gguf_tensor_names(ckpt.config).items() if len(shapes[h]) == 2}
    have = set(recipe.types)
    if have != want:
        diff = sorted(have ^ want)
        raise UsageError(f"the recipe does not match this model (e.g. tensor {diff[0]}); "
                         f"make a new one with --target-size")
    bad = sorted(t for t in set(recipe.types.values()) if t not in CANDIDATES)
    if bad:
        raise UsageError(f"the recipe uses unknown type {bad[0]}; known: {', '.join(CANDIDATES)}")
    from .gguf_blocks import GPTQ_TYPES

    odd = sorted(n for n in recipe.gptq if recipe.types.get(n) not in GPTQ_TYPES)
    if odd:
        raise UsageError(f"the recipe asks for GPTQ blocks of tensor {odd[0]}, whose type edgellm cannot write")


def parse_size(text: str) -> int:
    """'90MB', '92.5 MiB', '1.2G', '98000000' -> bytes (decimal units, like file managers and ls -h --si)."""
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    try:
        value = float(num) * units[s[len(num):]]
    except (ValueError, KeyError):
        raise UsageError(f"cannot read size {text!r}; write e.g. 90MB, 92.5MiB or 1.2GB") from None
    if value <= 0:
        raise UsageError(f"target size must be positive, not {text!r}")
    return int(value)


__all__ = ["CANDIDATES", "Option", "Recipe", "check_recipe", "choose", "measure_options", "parse_size", "plan",
           "recipe_path"]
