"""Structured pruning: a smaller *standard* checkpoint (uniform dims per layer) cut by importance scores.

Axes: depth (whole decoder layers), ffn (neurons, the same count in every layer), heads (KV groups and the
query heads inside each group, so grouped-query attention stays uniform) and hidden (residual-stream
channels, embedding included). A budget (`100M` parameters or a ratio) is met by searching the shapes the
allowed axes reach (dims aligned to `align` where they are cut), scoring each pruned candidate by its KL
divergence to the unpruned model on calibration tokens, and keeping the best (Minitron's recipe, with the
light retraining of candidates left out).

With `refit` (the default), each candidate is compensated in closed form (converters/refit.py): neurons and
heads are chosen by the error left after refitting the projection that reads them, down_proj/o_proj (and,
when hidden channels go, the readers of the stream) are refitted by ridge least squares to the unpruned
model's outputs on calibration text, and the layers removed are those whose residual update a linear
replacement (absorbed into the previous layer's down_proj) reproduces best. Without it, structures are cut
by importance alone and the kept weights are sliced unchanged.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgellm.errors import UsageError

from .checkpoint import Checkpoint, ModelConfig, TensorSource, hf_tensor_shapes
from .importance import Importance

AXES = ("depth", "ffn", "heads", "hidden")
MIN_FRAC = {"hidden": 0.5, "ffn": 0.25}   # never offer narrower than this fraction of the original


@dataclass(frozen=True)
class Shape:
    n_layer: int
    hidden: int
    ffn: int
    n_kv: int
    q_per_kv: int

    @property
    def n_head(self) -> int:
        return self.n_kv * self.q_per_kv

    def describe(self) -> str:
        return (f"{self.n_layer} layers, hidden {self.hidden}, ffn {self.ffn}, "
                f"{self.n_head} heads / {self.n_kv} kv")


def shape_of(config: ModelConfig) -> Shape:
    return Shape(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                 config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads)


def shaped(config: ModelConfig, s: Shape) -> ModelConfig:
    return dataclasses.replace(config, num_hidden_layers=s.n_layer, hidden_size=s.hidden, intermediate_size=s.ffn,
                               num_attention_heads=s.n_head, num_key_value_heads=s.n_kv)


def n_params(config: ModelConfig) -> int:
    return sum(int(np.prod(s)) for s in hf_tensor_shapes(config).values())


def parse_budget(text: str, total: int) -> int:
    """'100M', '1.5B', '90000000', '0.7' or '70%' -> a parameter count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB%]?)\s*", str(text))
    if not m:
        raise UsageError(f"--prune-to {text!r}: give a parameter count (100M, 1.2B) or a ratio (0.7, 70%)")
    value, unit = float(m.group(1)), m.group(2).upper()
    if unit == "%":
        value /= 100
    if unit in ("%", "") and value <= 1:
        if value <= 0:
            raise UsageError(f"--prune-to {text!r}: the ratio must be above 0")
        return int(total * value)
    return int(value * {"K": 1e3, "M": 1e6, "B": 1e9}.get(unit, 1))


def _options(full: int, align: int | None, axis: str, allowed: bool, step: int) -> list[int]:
    if not allowed:
        return [full]
    unit = align or step
    low = full * MIN_FRAC[axis]
    return [full] + [v for v in range(unit, full, unit) if v >= low][::-1]


def candidate_shapes(config: ModelConfig, target: int, *, align: int | None = None,
                     axes: Sequence[str] = AXES, slack: float = 0.9) -> list[Shape]:
    """Every shape within [slack * target, target] parameters the axes reach, widest first.

    Widths are cut to multiples of `align` (e.g. 256 for llama.cpp's K-quants); depth fills what is left.
    A HF-loadable checkpoint needs the hidden size to be a multiple of the head count (transformers checks).
    """
    bad = sorted(set(axes) - set(AXES))
    if bad or not axes:
        raise UsageError(f"unknown pruning axis {', '.join(bad) or '(none)'}; choose from {', '.join(AXES)}")
    full = shape_of(config)
    hidden = _options(full.hidden, align, "hidden", "hidden" in axes, 64)
    ffn = _options(full.ffn, align, "ffn", "ffn" in axes, 128)
    heads = [(full.n_kv, full.q_per_kv)]
    if "heads" in axes:
        heads += [(kv, q) for kv in range(full.n_kv, 0, -1) for q in range(full.q_per_kv, 0, -1)
                  if (kv, q) != heads[0] and (not align or (kv * q * config.head_dim) % align == 0)]
    depths = range(full.n_layer, 0, -1) if "depth" in axes else [full.n_layer]
    out, smallest = [], None
    for h in hidden:
        for f in ffn:
            for kv, q in heads:
                if h % (kv * q):
                    continue
                for n in depths:
                    s = Shape(n, h, f, kv, q)
                    p = n_params(shaped(config, s))
                    if smallest is None or p < smallest[0]:
                        smallest = (p, s)
                    if p <= target:
                        if p >= slack * target:
                            out.append((p, s))
                        break
    if not out:
        if smallest is None or smallest[0] > target:
            low = smallest[0] if smallest else n_params(config)
            raise UsageError(
                f"no model with {', '.join(axes)} pruning{f' aligned to {align}' if align else ''} has at most "
                f"{target / 1e6:.1f}M parameters: the smallest reachable is {low / 1e6:.1f}M "
                f"({smallest[1].describe() if smallest else 'unpruned'}); ask for more, or allow more axes")
        raise UsageError(f"no shape lands within {100 * (1 - slack):.0f}% under {target / 1e6:.1f}M parameters "
                         "with these axes and alignment; try a different budget or --align")
    out.sort(key=lambda ps: -ps[0])
    return [s for _, s in out]


# -- a plan: which indices survive -------------------------------------------------------------------------
@dataclass
class PrunePlan:
    shape: Shape
    layers: list[int]                 # kept decoder layers (original indices, in order)
    hidden: np.ndarray                # kept residual channels
    ffn: list[np.ndarray]             # per kept layer: kept neurons
    groups: list[np.ndarray]          # per kept layer: kept KV groups
    heads: list[np.ndarray]           # per kept layer: kept query heads, grouped by kept KV group
    norm_scale: dict[str, float] = field(default_factory=dict)   # RMSNorm rescale for the lost channels
    fits: list = field(default_factory=list)               # refit.Fit per refitted projection (refit only)
    checkpoint: Checkpoint | None = field(default=None, repr=False)   # the pruned model, once built

    def summary(self, config: ModelConfig) -> dict:
        full = shape_of(config)
        return {"shape": dataclasses.asdict(self.shape), "from": dataclasses.asdict(full),
                "removed_layers": sorted(set(range(full.n_layer)) - set(self.layers)),
                "n_params": n_params(shaped(config, self.shape)), "n_params_before": n_params(config)}


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, in their original order (stable for ties)."""
    return np.sort(np.argsort(-scores, kind="stable")[:k])


def make_plan(config: ModelConfig, imp: Importance, s: Shape) -> PrunePlan:
    full = shape_of(config)
    if s.n_kv > full.n_kv or s.q_per_kv > full.q_per_kv or s.hidden > full.hidden or s.ffn > full.ffn \
            or s.n_layer > full.n_layer:
        raise UsageError(f"cannot prune {full.describe()} to a larger {s.describe()}")
    layers = [int(i) for i in _top(imp.layer, s.n_layer)]
    hidden = _top(imp.hidden, s.hidden)
    groups, heads = [], []
    for i in layers:
        g = _top(imp.group[i], s.n_kv)
        per = imp.head[i].reshape(full.n_kv, full.q_per_kv)
        groups.append(g)
        heads.append(np.concatenate([k * full.q_per_kv + _top(per[k], s.q_per_kv) for k in g]))
    scale = {}
    if s.hidden < full.hidden:
        for name, m in imp.norm_in_sq.items():
            scale[name] = float(np.sqrt(m[hidden].mean() / max(m.mean(), 1e-30)))
    return PrunePlan(s, layers, hidden, [_top(imp.ffn[i], s.ffn) for i in layers], groups, heads, scale)


def choose_layers(imp: Importance, scores, n_layer: int) -> list[int]:
    """The `n_layer` layers to keep: those whose residual update a fitted linear replacement reproduces
    worst (refit.layer_scores); without scores, the most influential by block influence."""
    rank = imp.layer if scores is None else scores.replaced
    return [int(i) for i in _top(np.asarray(rank), n_layer)]


def refit_candidate(ckpt: Checkpoint, imp: Importance, scores, s: Shape, chunks: Sequence[Sequence[int]], *,
                    states: bool = True, progress: Callable[[int, int], None] | None = None
                    ) -> tuple[PrunePlan, Checkpoint]:
    """Shape `s` with compensation (converters/refit.py): layers by post-replacement error, hidden channels by
    importance, neurons and heads by post-refit error, and the consuming projections refitted. The teacher's
    states kept in `scores` are reused when `states` (they must belong to these `chunks`)."""
    from .refit import refit_model

    base = make_plan(ckpt.config, imp, s)          # hidden channels and their norm rescale, as without refit
    layers = choose_layers(imp, scores, s.n_layer)
    r = refit_model(ckpt, chunks, layers=layers, hidden=base.hidden, ffn=s.ffn, n_kv=s.n_kv, q_per_kv=s.q_per_kv,
                    norm_scale=base.norm_scale, states=getattr(scores, "states", None) if states else None,
                    progress=progress)
    config = shaped(ckpt.config, s)
    shapes = hf_tensor_shapes(config)
    missing = sorted(set(shapes) - set(r.tensors))
    assert not missing, missing
    data = {n: np.ascontiguousarray(r.tensors[n], np.float32) for n in shapes}
    for n, w in data.items():
        assert w.shape == shapes[n], (n, w.shape, shapes[n])
    plan = PrunePlan(s, layers, base.hidden, r.ffn, r.groups, r.heads, base.norm_scale, r.fits)
    out = Checkpoint(config, TensorSource(shapes, data.__getitem__, {n: "F32" for n in shapes}), ckpt.tokenizer,
                     name=ckpt.name)
    return plan, out


def apply_plan(ckpt: Checkpoint, plan: PrunePlan) -> Checkpoint:
    """A lazy Checkpoint of the pruned model: each tensor is sliced from the source when loaded."""
    config = shaped(ckpt.config, plan.shape)
    d, hid = ckpt.config.head_dim, plan.hidden
    shapes = hf_tensor_shapes(config)

    def rows(blocks: np.ndarray) -> np.ndarray:   # head indices -> their rows in a projection
        return (blocks[:, None] * d + np.arange(d)).reshape(-1)

    def load(name: str) -> np.ndarray:
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        if not m:
            w = ckpt.tensors.load(name)
            if name == "model.norm.weight":
                return w[hid] * plan.norm_scale.get(name, 1.0)
            return w[:, hid]                    # embed_tokens, lm_head
        j, rest = int(m.group(1)), m.group(2)
        old = f"model.layers.{plan.layers[j]}.{rest}"
        w = ckpt.tensors.load(old)
        if rest.endswith("layernorm.weight"):
            return w[hid] * plan.norm_scale.get(old, 1.0)
        q, kv = rows(plan.heads[j]), rows(plan.groups[j])
        if ".q_proj." in rest:
            return w[q][:, hid] if w.ndim == 2 else w[q]
        if ".k_proj." in rest or ".v_proj." in rest:
            return w[kv][:, hid] if w.ndim == 2 else w[kv]
        if ".o_proj." in rest:
            return w[hid][:, q] if w.ndim == 2 else w[hid]
        if ".down_proj." in rest:
            return w[hid][:, plan.ffn[j]]
        return w[plan.ffn[j]][:, hid]           # gate_proj, up_proj

    def load_checked(name: str) -> np.ndarray:
        out = np.ascontiguousarray(load(name), dtype=np.float32)
        assert out.shape == shapes[name], (name, out.shape, shapes[name])
        return out

    return Checkpoint(config, TensorSource(shapes, load_checked, {n: "F32" for n in shapes}), ckpt.tokenizer,
                      name=ckpt.name)


def materialize(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint with every tensor loaded once (pruning many candidates re-reads each tensor)."""
    data = {name: np.ascontiguousarray(w, dtype=np.float32) for name, w in ckpt.tensors}
    return dataclasses.replace(ckpt, tensors=TensorSource(dict(ckpt.tensors.shapes), data.__getitem__,
                                                          dict(ckpt.tensors.dtypes)))


# -- choosing among shapes ---------------------------------------------------------------------------------
@dataclass
class Candidate:
    shape: Shape
    n_params: int
    kld: float          # mean KL(unpruned || pruned) on the scoring tokens
    top1: float


def kl_to(teacher_logits, model, ids) -> tuple[float, float]:
    """Mean KL(teacher || model) per token and top-1 agreement, torch tensors in, floats out."""
    import torch

    with torch.no_grad():
        lq = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
        lp = torch.log_softmax(teacher_logits.double(), -1)
        kld = (lp.exp() * (lp - lq)).sum(-1).mean()
        top1 = (lp.argmax(-1) == lq.argmax(-1)).double().mean()
    return float(kld), float(top1)


def choose_plan(ckpt: Checkpoint, imp: Importance, tokens: Sequence[int], target: int, *,
                align: int | None = None, axes: Sequence[str] = AXES, max_candidates: int = 16,
                progress: Callable[[int, int], None] | None = None,
                build: Callable[[Shape], tuple[PrunePlan, Checkpoint]] | None = None
                ) -> tuple[PrunePlan, list[Candidate]]:
    """The candidate shape whose pruned model is closest to `ckpt` on `tokens`, and every candidate's score.
    `build(shape)` makes a candidate's plan and checkpoint (default: importance cuts, sliced weights); the
    chosen candidate's plan is returned with its checkpoint in `plan.checkpoint`."""
    import torch

    from .torch_llama import to_torch

    if build is None:
        def build(s: Shape) -> tuple[PrunePlan, Checkpoint]:
            p = make_plan(ckpt.config, imp, s)
            return p, apply_plan(ckpt, p)

    shapes = candidate_shapes(ckpt.config, target, align=align, axes=axes)
    if len(shapes) > max_candidates:   # keep the spread: evenly spaced over the widest-first list
        shapes = [shapes[i] for i in np.linspace(0, len(shapes) - 1, max_candidates).round().astype(int)]
    ids = torch.tensor([list(tokens)])
    with torch.no_grad():
        ref = to_torch(ckpt)(input_ids=ids).logits
    cands, best = [], None
    for k, s in enumerate(shapes):
        plan, pruned = build(s)
        kld, top1 = kl_to(ref, to_torch(pruned), ids)
        cands.append(Candidate(s, n_params(pruned.config), kld, top1))
        if best is None or kld < best[0]:
            best = (kld, plan, pruned)
        if progress:
            progress(k + 1, len(shapes))
    best[1].checkpoint = best[2]
    return best[1], cands


# -- end to end --------------------------------------------------------------------------------------------
@dataclass
class PruneResult:
    checkpoint: Checkpoint
    plan: PrunePlan
    importance: Importance
    candidates: list[Candidate]
    calib_tokens: int
    layer_scores: object | None = None     # refit.LayerScores, with refit

    def explain(self, config: ModelConfig, top: int = 8) -> dict:
        """The importance ranking and the chosen cuts, JSON-ready (what `prune --explain` prints)."""
        imp, p = self.importance, self.plan
        order = np.argsort(imp.layer)
        return {
            **p.summary(config),
            "layer_influence": {int(i): round(float(imp.layer[i]), 5) for i in order},
            "kv_group_scores": [[round(float(x), 3) for x in row] for row in imp.group],
            "ffn_kept_score_share": round(float(np.mean([imp.ffn[i][k].sum() / imp.ffn[i].sum()
                                                         for i, k in zip(p.layers, p.ffn)])), 5),
            "hidden_least_important": [int(c) for c in np.argsort(imp.hidden)[:top]],
            "hidden_kept_score_share": round(float(imp.hidden[p.hidden].sum() / imp.hidden.sum()), 5),
            "candidates": [{"shape": c.shape.describe(), "n_params": c.n_params, "kld": round(c.kld, 5),
                            "top1": round(c.top1, 4), "chosen": c.shape == p.shape} for c in self.candidates],
            "calibration_tokens": self.calib_tokens,
            **self._refit_explain(),
        }

    def _refit_explain(self) -> dict:
        """Per refitted projection, the relative output error of the plain cut and after the refit; per layer,
        the share of the stream its update carries before and after a fitted linear replacement."""
        if not self.plan.fits and self.layer_scores is None:
            return {"refit": False}
        fits = [f.to_dict() for f in self.plan.fits]
        total = {w: [round(float(np.mean([f[k] for f in fits if f["what"] == w])), 5) for k in ("before", "after")]
                 for w in dict.fromkeys(f["what"] for f in fits)}
        out = {"refit": True, "refit_errors": fits, "refit_mean_error": total}
        if self.layer_scores is not None:
            ls = self.layer_scores
            out["layer_replacement"] = {int(i): [round(float(ls.plain[i]), 5), round(float(ls.replaced[i]), 5)]
                                        for i in np.argsort(ls.replaced)}
        return out


def prune_model(ckpt: Checkpoint, target: int | str, *, align: int | None = None, axes: Sequence[str] = AXES,
                calib_text: str | None = None, calib_tokens: int = 2048, score_tokens: int = 512,
                max_candidates: int = 16, threads: int | None = None, refit: bool = True,
                refit_tokens: int = 8192, screen_tokens: int = 2048,
                progress: Callable[[str, int, int], None] | None = None) -> PruneResult:
    """Prune `ckpt` to `target` parameters (a count, or a string like '100M' / '0.7') by calibrated importance.

    The first `calib_tokens` of the calibration text score the structures; the next `score_tokens`
    score the candidate shapes, so the choice is not judged on the tokens that ranked the structures.
    With `refit`, candidates are refitted on `screen_tokens` calibration tokens outside the scoring ones, and
    the chosen shape again on up to `refit_tokens` of them (more tokens, less overfitting; one pass).
    """
    import torch

    from edgellm.texts import calibration_text

    from .importance import compute_importance
    from .torch_llama import tokenize

    if threads:
        torch.set_num_threads(threads)
    total = n_params(ckpt.config)
    target = parse_budget(target, total) if isinstance(target, str) else int(target)
    if align is not None and align < 1:
        raise UsageError("--align must be a positive number of elements (e.g. 32 or 256)")
    text = calibration_text() if calib_text is None else calib_text
    if not text.strip():
        raise UsageError("the calibration text is empty; pruning needs text to measure importance on (--calib)")
    tokens = tokenize(ckpt, text)
    n_imp = min(calib_tokens, max(64, len(tokens) - score_tokens))
    stage = (lambda name: (lambda d, t: progress(name, d, t))) if progress else (lambda name: None)
    src = materialize(ckpt)
    if target >= total:   # nothing to cut: the same model (and its logits), as a plain checkpoint
        shape = shape_of(ckpt.config)
        imp = compute_importance(src, tokens[:n_imp], progress=stage("importance"))
        plan = make_plan(ckpt.config, imp, shape)
        return PruneResult(apply_plan(src, plan), plan, imp, [], n_imp)
    candidate_shapes(ckpt.config, target, align=align, axes=axes)   # impossible budgets fail before the work
    imp = compute_importance(src, tokens[:n_imp], progress=stage("importance"))
    scoring = tokens[n_imp:n_imp + score_tokens]
    if len(scoring) < 64:
        scoring = tokens[:score_tokens]
    build, scores = None, None
    if refit:
        from .refit import layer_scores

        pool = tokens[:n_imp] + tokens[n_imp + score_tokens:]   # never the candidate-scoring tokens
        screen = _chunks(pool[:max(screen_tokens, 64)])
        scores = layer_scores(src, screen, progress=stage("layer scores"))

        def build(s: Shape) -> tuple[PrunePlan, Checkpoint]:
            return refit_candidate(src, imp, scores, s, screen, progress=stage("refit candidate"))
    plan, cands = choose_plan(src, imp, scoring, target, align=align, axes=axes, max_candidates=max_candidates,
                              progress=stage("candidates"), build=build)
    if refit and len(pool) > screen_tokens and refit_tokens > screen_tokens:
        # the chosen shape (same layers) once more on every calibration token: more tokens, less overfitting
        final = _chunks(pool[:refit_tokens])
        plan, ckpt_final = refit_candidate(src, imp, scores, plan.shape, final, states=False, progress=stage("refit"))
        plan.checkpoint = ckpt_final
    return PruneResult(plan.checkpoint, plan, imp, cands, n_imp, scores)


def _chunks(tokens: Sequence[int], size: int = 512) -> list[Sequence[int]]:
    return [tokens[i:i + size] for i in range(0, len(tokens), size) if len(tokens[i:i + size]) >= 16]
