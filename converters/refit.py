"""Compensate what pruning removes: refit the projections that read the pruned structures, in closed form.

Structured pruning cuts FFN neurons, attention heads, hidden channels and whole layers. Slicing the
weights loses everything the cut structures wrote; most of it is linearly predictable from what is kept
(FLAP's bias compensation, SlimGPT / ZipLM's structured optimal brain surgeon). Here, layer by layer on
calibration text, in the one reference forward pass (converters/reference.py):

- the pruned model (the student) and the unpruned one (the teacher) run side by side, each on its own
  residual stream, so every refit sees the inputs the student really has after the cuts above it;
- FFN neurons (and attention heads) are chosen by structured OBS on the student's own activations: the
  error a group of columns leaves *after* the remaining columns are refitted (ridge towards the unpruned
  weights W0, as below), removed greedily with the rank-|R| update of W and H⁻¹. The target of the choice
  is the layer's own writes W0 x on those activations (what the removed structures wrote, as in SlimGPT /
  ZipLM), not the drift-corrected one below: W0 then fits it exactly, every removal costs ≥ 0, and a neuron
  that never fires or a head whose o_proj columns are zero costs exactly nothing and goes first;
- down_proj and o_proj are then refitted by ridge least squares (towards the sliced weights, λ a small
  share of the mean input energy) to reproduce the teacher's output on the kept channels — for down_proj
  also the writes of any teacher layers removed right after it (the "fitted linear replacement" of a
  deleted layer, absorbed into the previous layer's FFN output instead of a new module);
- with hidden channels removed, the readers of the normalised stream (q/k/v, gate/up) are refitted the
  same way from the kept channels to the teacher's pre-activations.
Which layers go is chosen by the same idea: each layer's residual update is regressed on the previous
layer's FFN activations, and the layers whose update that linear replacement leaves least of are removed.
The result stays a standard checkpoint: only the values of the kept weights change.

Hand-written: no library refits pruned transformer projections from calibration statistics.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .calibrate import dims_of, weight_getter
from .checkpoint import Checkpoint
from .reference import Dims, _rmsnorm, attend, embed, mlp_act

# Ridge strength as a share of the mean diagonal of the input Gram matrix (λ = α·tr(G)/d), pulling towards the
# sliced weights. Measured on held-out activations of SmolLM2 (down_proj with 2/3 of the neurons kept, o_proj
# with 6 of 9 heads, 2k-8k calibration tokens): α = 1 is at or near the least held-out error for both;
# α = 0.01 overfits down_proj's 1,000+ inputs so badly that the refit loses to plain slicing.
ALPHA = 1.0
Progress = Callable[[int, int], None]


# -- the algebra --------------------------------------------------------------------------------------------
def _lam(gram: np.ndarray, alpha: float) -> float:
    return alpha * max(float(np.trace(gram)) / len(gram), 1e-12)


def ridge(cross: np.ndarray, gram: np.ndarray, w0: np.ndarray | None = None, alpha: float = ALPHA) -> np.ndarray:
    """argmin_W Σ‖y − W x‖² + λ‖W − W0‖² from cross = Σ y xᵀ and gram = Σ x xᵀ: W = (C + λW0)(G + λI)⁻¹."""
    lam = _lam(gram, alpha)
    a = np.asarray(gram, np.float64) + lam * np.eye(len(gram))
    b = np.asarray(cross, np.float64) + (lam * np.asarray(w0, np.float64) if w0 is not None else 0.0)
    return np.linalg.solve(a, b.T).T


def fit_error(yy: float, cross: np.ndarray, gram: np.ndarray, w: np.ndarray) -> float:
    """Σ‖y − W x‖² from the sums Σ‖y‖², Σ y xᵀ and Σ x xᵀ."""
    w = np.asarray(w, np.float64)
    return float(yy - 2 * np.einsum("ij,ij->", w, cross) + np.einsum("ij,ij->", w @ gram, w))


def obs_select(cross: np.ndarray, gram: np.ndarray, groups: Sequence[np.ndarray], n_keep: int, *,
               alpha: float = ALPHA, batch: int = 1, w0: np.ndarray | None = None,
               removable: Callable[[set[int], int], bool] | None = None) -> list[int]:
    """The `n_keep` column groups to keep so that the refitted output error is least (structured OBS).

    Starting from the ridge fit on every column (pulled towards `w0`, the unpruned projection, as the final
    refit is; towards zero without it), the group whose removal, with every other column refitted, raises
    the output error Σ‖y − W x‖² least goes; W and H⁻¹ = (G + λI)⁻¹ are updated in closed form, and so on.
    `batch` groups of size one go per step (FFN neurons: hundreds of steps otherwise). `removable(alive, g)`
    restricts the choice (uniform query heads per KV group).

    The score is the rise of the output error itself, not of the ridge objective (which for λ → 0 is the
    classic tr(W_R (H⁻¹_RR)⁻¹ W_Rᵀ)): removing R changes W by D = −W_R M H⁻¹_R· with M = (H⁻¹_RR)⁻¹, and as
    W G − C = λ(W0 − W) on the live columns, Δ = tr(W_R M W_Rᵀ) − λ tr(W_R M (H⁻²)_RR M W_Rᵀ)
    − 2λ tr((W0 − W) H⁻¹_·R M W_Rᵀ). The ridge objective would also count λ‖W_R − W0_R‖² (a magnitude
    term), and a ridge towards zero spreads the output over correlated or unseen columns (fewer tokens than
    columns): either way a head whose o_proj columns are zero, which changes nothing when removed, scored
    like a live one. Here its W_R stays W0_R = 0 and Δ = 0; a neuron that never fires has Δ = 0 as well."""
    lam = _lam(gram, alpha)
    hinv = np.linalg.inv(np.asarray(gram, np.float64) + lam * np.eye(len(gram)))
    w0 = np.zeros_like(np.asarray(cross, np.float64)) if w0 is None else np.asarray(w0, np.float64)
    w = (np.asarray(cross, np.float64) + lam * w0) @ hinv
    drift = None                                    # (W0 − W) H⁻¹, kept up to date for the single-column scores
    alive = set(range(len(groups)))
    while len(alive) > n_keep:
        cand = [g for g in sorted(alive) if removable is None or removable(alive, g)]
        if not cand:
            raise ValueError("no group may be removed under the constraint")
        single = all(len(groups[g]) == 1 for g in cand)
        if single:                                  # one column each: the scores in one vectorised step
            idx = np.array([groups[g][0] for g in cand])
            hd = np.maximum(np.diag(hinv)[idx], 1e-300)
            wr = w[:, idx]
            if drift is None:
                drift = (w0 - w) @ hinv
            scores = (wr ** 2).sum(0) * (hd - lam * (hinv[idx] ** 2).sum(1)) / hd ** 2 \
                - 2 * lam * (wr * drift[:, idx]).sum(0) / hd
        else:
            scores = np.array([_removal_error(w, w0, hinv, groups[g], lam) for g in cand])
        order = np.argsort(scores, kind="stable")
        take = [cand[i] for i in order[:max(1, min(batch if single else 1, len(alive) - n_keep))]]
        r = np.concatenate([groups[g] for g in take])
        sub_inv = np.linalg.inv(hinv[np.ix_(r, r)])
        u, v = w[:, r] @ sub_inv, hinv[r, :]
        if drift is not None:
            # A = W0 − W gains U V and H⁻¹ loses H⁻¹_·R M V, so with Q = V H⁻¹: A' H⁻¹' = A H⁻¹ + U Q
            # − ((A H⁻¹)_·R + U Q_·R) M V — a rank-|R| update instead of the out × n × n product every step.
            q = v @ hinv
            drift += u @ q - (drift[:, r] + u @ q[:, r]) @ sub_inv @ v
        w -= u @ v
        hinv -= hinv[:, r] @ sub_inv @ v
        w[:, r] = 0.0
        hinv[r, :] = 0.0
        hinv[:, r] = 0.0
        alive -= set(take)
    return sorted(alive)



def _removal_error(w: np.ndarray, w0: np.ndarray, hinv: np.ndarray, r: np.ndarray, lam: float) -> float:
    """The rise of Σ‖y − W x‖² when the columns `r` go and the rest is refitted (obs_select's Δ, one group)."""
    m = np.linalg.inv(hinv[np.ix_(r, r)])
    wm = w[:, r] @ m
    h_r = hinv[r]
    return float(np.einsum("ij,ij->", wm, w[:, r]) - lam * np.einsum("ij,ij->", wm @ (h_r @ h_r.T), wm)
                 - 2 * lam * np.einsum("ij,ij->", (w0 - w) @ h_r.T, wm))


# -- statistics over chunks ---------------------------------------------------------------------------------
class Sums:
    """Σ x xᵀ, Σ y xᵀ and Σ‖y‖² over chunks, in float64."""

    def __init__(self) -> None:
        self.gram: np.ndarray | None = None
        self.cross: np.ndarray | None = None
        self.yy = 0.0
        self.n = 0

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        g = (x.T @ x).astype(np.float64)
        self.gram = g if self.gram is None else self.gram + g
        if y is not None:
            c = (y.T @ x).astype(np.float64)
            self.cross = c if self.cross is None else self.cross + c
            self.yy += float(np.einsum("ij,ij->", y, y, dtype=np.float64))
        self.n += len(x)


@dataclass
class Fit:
    """One refitted projection: relative output error Σ‖y − W x‖² / Σ‖y‖² of the plain cut (sliced weights)
    and after the refit, on the calibration tokens."""

    layer: int            # the teacher's layer index
    what: str             # o_proj, down_proj, qkv, gate_up
    before: float
    after: float

    def to_dict(self) -> dict:
        return {"layer": self.layer, "what": self.what, "before": round(self.before, 5), "after": round(self.after, 5)}


# -- which layers: the residual update a linear replacement cannot reproduce ---------------------------------
@dataclass
class TeacherStates:
    """The unpruned model's residual stream on the calibration chunks: at each layer's input (`h`, one more
    entry for the final output) and after each layer's attention (`mid`). Every candidate's refit aims at
    these, so they are computed once."""

    h: list[list[np.ndarray]]
    mid: list[list[np.ndarray]]


@dataclass
class LayerScores:
    plain: np.ndarray      # (L,) ‖Δ_i‖² / ‖h_{i+1}‖²: what deleting layer i drops from the residual stream
    replaced: np.ndarray   # (L,) the same after Δ_i is regressed on layer i−1's FFN activations
    states: TeacherStates | None = field(default=None, repr=False)


STATE_LIMIT = 1 << 30    # keep the teacher's states for the refit when they take at most this many bytes


def layer_scores(ckpt: Checkpoint, chunks: Sequence[Sequence[int]], *, alpha: float = ALPHA,
                 progress: Progress | None = None) -> LayerScores:
    """Per layer, the share of the residual stream its update Δ_i = h_{i+1} − h_i carries, before and after the
    best ridge fit of Δ_i from layer i−1's FFN activations (the linear replacement a deletion would get).
    The teacher's states come along when they fit in STATE_LIMIT bytes."""
    dims, get = dims_of(ckpt.config), weight_getter(ckpt)
    hs = [embed(get, c) for c in chunks]
    keep = 8 * (dims.n_layer + 1) * sum(len(c) for c in chunks) * dims.n_embd <= STATE_LIMIT
    states = TeacherStates([list(hs)], []) if keep else None
    prev_act: list[np.ndarray] | None = None
    plain, replaced = np.zeros(dims.n_layer), np.zeros(dims.n_layer)
    for i in range(dims.n_layer):
        acts, mids, norms = [], [], 0.0
        fit = Sums()
        for k, h in enumerate(hs):
            _, mid, a, nxt = _teacher_layer(dims, get, i, h, acts=True)
            d = nxt - h
            norms += float((nxt.astype(np.float64) ** 2).sum())
            if prev_act is not None:
                fit.add(prev_act[k], d)
            else:
                fit.yy += float((d.astype(np.float64) ** 2).sum())
            acts.append(a)
            mids.append(mid)
            hs[k] = nxt
        if states is not None:
            states.mid.append(mids)
            states.h.append(list(hs))
        plain[i] = fit.yy / norms
        replaced[i] = plain[i] if prev_act is None else \
            fit_error(fit.yy, fit.cross, fit.gram, ridge(fit.cross, fit.gram, alpha=alpha)) / norms
        prev_act = acts
        if progress:
            progress(i + 1, dims.n_layer)
    return LayerScores(plain, replaced, states)


# -- the sequential refit ------------------------------------------------------------------------------------
@dataclass
class RefitResult:
    tensors: dict[str, np.ndarray]                # the pruned checkpoint's weights (HF names)
    ffn: list[np.ndarray]                          # per kept layer: kept neurons (teacher indices)
    groups: list[np.ndarray]                       # per kept layer: kept KV groups
    heads: list[np.ndarray]                        # per kept layer: kept query heads
    fits: list[Fit] = field(default_factory=list)


def _dims(base: Dims, hidden: int, n_head: int, n_kv: int) -> Dims:
    return Dims(1, hidden, n_head, n_kv, base.head_dim, base.eps, base.rope_theta, base.tied)


def _cols(blocks: np.ndarray, d: int) -> np.ndarray:
    return (np.asarray(blocks)[:, None] * d + np.arange(d)).reshape(-1)


def refit_model(teacher: Checkpoint, chunks: Sequence[Sequence[int]], *, layers: Sequence[int], hidden: np.ndarray,
                ffn: int, n_kv: int, q_per_kv: int, norm_scale: dict[str, float] | None = None,
                alpha: float = ALPHA, refit_readers: bool | None = None, correct_drift: bool = True,
                states: TeacherStates | None = None, progress: Progress | None = None) -> RefitResult:
    """Prune `teacher` to the kept `layers` and `hidden` channels with `ffn` neurons and `n_kv` × `q_per_kv`
    heads per layer, choosing neurons and heads by post-refit error and refitting as described above.
    Readers are refitted when hidden channels go (default) or when `refit_readers` says so.
    `correct_drift`: o_proj and down_proj aim at the teacher's residual stream itself (so they also absorb
    what the cuts above left wrong in it), not only at the teacher's own writes. `states`: the teacher's
    stream on these chunks (layer_scores keeps it), else the teacher runs here too."""
    cfg = teacher.config
    T = dims_of(cfg)
    tget = weight_getter(teacher)
    d = T.head_dim
    hid = np.asarray(hidden)
    cut_hidden = len(hid) < T.n_embd
    readers = cut_hidden if refit_readers is None else refit_readers
    scale = norm_scale or {}
    full_q = T.n_head // T.n_head_kv
    kept = sorted(layers)
    out: dict[str, np.ndarray] = {}
    res = RefitResult(out, [], [], [])
    ht = states.h[0] if states is not None else [embed(tget, c) for c in chunks]
    hs = [h[:, hid].copy() for h in ht]
    out["model.embed_tokens.weight"] = np.ascontiguousarray(tget("model.embed_tokens.weight")[:, hid])
    out["model.norm.weight"] = tget("model.norm.weight")[hid] * scale.get("model.norm.weight", 1.0)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(tget("lm_head.weight")[:, hid])
    i = 0
    for j, layer_i in enumerate(kept):
        while i < layer_i:                         # teacher layers removed before this one: the teacher runs them
            ht = states.h[i + 1] if states is not None else [_teacher_layer(T, tget, i, h)[2] for h in ht]
            i += 1
        t, s = f"model.layers.{i}", f"model.layers.{j}"
        nxt = kept[j + 1] if j + 1 < len(kept) else T.n_layer
        g_in = tget(f"{t}.input_layernorm.weight")[hid] * scale.get(f"{t}.input_layernorm.weight", 1.0)
        g_post = tget(f"{t}.post_attention_layernorm.weight")[hid] * scale.get(
            f"{t}.post_attention_layernorm.weight", 1.0)
        out[f"{s}.input_layernorm.weight"], out[f"{s}.post_attention_layernorm.weight"] = g_in, g_post
        # teacher: this layer, then the removed ones up to the next kept layer (their writes are down_proj's too)
        if states is not None:
            tmid, target_end = states.mid[i], states.h[nxt]
        else:
            tmid, target_end = [], []
            for h in ht:
                _, mid, after = _teacher_layer(T, tget, i, h)
                tmid.append(mid)
                target_end.append(after)
            for r in range(i + 1, nxt):
                target_end = [_teacher_layer(T, tget, r, h)[2] for h in target_end]
        # attention: readers (q/k/v) on the student's normalised stream, every teacher head first
        w = {n: tget(f"{t}.self_attn.{n}.weight") for n in ("q_proj", "k_proj", "v_proj")}
        sw = {n: m[:, hid] for n, m in w.items()}
        if readers:
            sw = _refit_readers(w, sw, [_rmsnorm(h, tget(f"{t}.input_layernorm.weight"), T.eps) for h in ht],
                                [_rmsnorm(h, g_in, T.eps) for h in hs], alpha, res.fits, i, "qkv")
        bias = {f"{s}.self_attn.{n}.bias": tget(f"{t}.self_attn.{n}.bias") for n in sw}   # Qwen2: q/k/v biases
        full = _getter({f"{s}.input_layernorm.weight": g_in, **{f"{s}.self_attn.{n}.weight": m for n, m in sw.items()},
                        **{k: v for k, v in bias.items() if v is not None}})
        os_full = [attend(_dims(T, len(hid), T.n_head, T.n_head_kv), full, j, h) for h in hs]
        w_o = tget(f"{t}.self_attn.o_proj.weight")[hid]
        st = Sums()
        for o, h, mid, ht_i in zip(os_full, hs, tmid, ht):
            st.add(o, (mid[:, hid] - (h if correct_drift else ht_i[:, hid])))   # what attention must add
        kv, heads = _choose_heads(st, w_o, n_kv, q_per_kv, full_q, T.n_head_kv, d, alpha)
        cols = _cols(heads, d)
        w_o2 = ridge(st.cross[:, cols], st.gram[np.ix_(cols, cols)], w_o[:, cols], alpha)
        res.fits.append(Fit(i, "o_proj", fit_error(st.yy, st.cross[:, cols], st.gram[np.ix_(cols, cols)],
                                                   w_o[:, cols]) / st.yy,
                            fit_error(st.yy, st.cross[:, cols], st.gram[np.ix_(cols, cols)], w_o2) / st.yy))
        q_rows, kv_rows = _cols(heads, d), _cols(kv, d)
        out[f"{s}.self_attn.q_proj.weight"] = np.ascontiguousarray(sw["q_proj"][q_rows], np.float32)
        out[f"{s}.self_attn.k_proj.weight"] = np.ascontiguousarray(sw["k_proj"][kv_rows], np.float32)
        out[f"{s}.self_attn.v_proj.weight"] = np.ascontiguousarray(sw["v_proj"][kv_rows], np.float32)
        for n, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            if bias[f"{s}.self_attn.{n}.bias"] is not None:
                out[f"{s}.self_attn.{n}.bias"] = np.ascontiguousarray(bias[f"{s}.self_attn.{n}.bias"][rows])
        out[f"{s}.self_attn.o_proj.weight"] = w_o2.astype(np.float32)
        hs = [h + o[:, cols] @ w_o2.T.astype(np.float32) for h, o in zip(hs, os_full)]
        # MLP: readers, then neurons chosen and down_proj refitted to the teacher's stream at the next kept layer
        w = {n: tget(f"{t}.mlp.{n}.weight") for n in ("gate_proj", "up_proj")}
        sw = {n: m[:, hid] for n, m in w.items()}
        if readers:
            sw = _refit_readers(w, sw, [_rmsnorm(h, tget(f"{t}.post_attention_layernorm.weight"), T.eps) for h in tmid],
                                [_rmsnorm(h, g_post, T.eps) for h in hs], alpha, res.fits, i, "gate_up")
        mlp = _getter({f"{s}.post_attention_layernorm.weight": g_post,
                       **{f"{s}.mlp.{n}.weight": m for n, m in sw.items()}})
        acts = [mlp_act(_dims(T, len(hid), T.n_head, T.n_head_kv), mlp, j, h) for h in hs]
        sd = Sums()
        for a, h, end, mid in zip(acts, hs, target_end, tmid):
            sd.add(a, end[:, hid] - (h if correct_drift else mid[:, hid]))
        w_d = tget(f"{t}.mlp.down_proj.weight")[hid]
        neurons = np.arange(acts[0].shape[1]) if ffn >= acts[0].shape[1] else np.asarray(obs_select(
            w_d @ sd.gram, sd.gram, [np.array([k]) for k in range(acts[0].shape[1])], ffn, alpha=alpha,
            batch=max(1, (acts[0].shape[1] - ffn) // 24), w0=w_d))
        w_d = w_d[:, neurons]
        g, c = sd.gram[np.ix_(neurons, neurons)], sd.cross[:, neurons]
        w_d2 = ridge(c, g, w_d, alpha)
        res.fits.append(Fit(i, "down_proj", fit_error(sd.yy, c, g, w_d) / sd.yy, fit_error(sd.yy, c, g, w_d2) / sd.yy))
        out[f"{s}.mlp.gate_proj.weight"] = np.ascontiguousarray(sw["gate_proj"][neurons], np.float32)
        out[f"{s}.mlp.up_proj.weight"] = np.ascontiguousarray(sw["up_proj"][neurons], np.float32)
        out[f"{s}.mlp.down_proj.weight"] = w_d2.astype(np.float32)
        hs = [h + a[:, neurons] @ w_d2.T.astype(np.float32) for h, a in zip(hs, acts)]
        ht = target_end
        i = nxt
        res.ffn.append(neurons)
        res.groups.append(kv)
        res.heads.append(heads)
        if progress:
            progress(j + 1, len(kept))
    return res


def _teacher_layer(T: Dims, get, i: int, h: np.ndarray, acts: bool = False) -> tuple[np.ndarray, ...]:
    """The teacher's layer i: attention output (o_proj's input), stream after attention, (with `acts` the FFN
    activations,) stream after the layer."""
    p = f"model.layers.{i}"
    o = attend(T, get, i, h)
    mid = h + o @ get(f"{p}.self_attn.o_proj.weight").T
    a = mlp_act(T, get, i, mid)
    after = mid + a @ get(f"{p}.mlp.down_proj.weight").T
    return (o, mid, a, after) if acts else (o, mid, after)


def _getter(table: dict[str, np.ndarray]):
    return lambda name: table.get(name)


def _refit_readers(w_full: dict[str, np.ndarray], w_cut: dict[str, np.ndarray], x_teacher: list[np.ndarray],
                   x_student: list[np.ndarray], alpha: float, fits: list[Fit], layer: int, what: str
                   ) -> dict[str, np.ndarray]:
    """Readers of the normalised stream refitted from the student's (fewer) channels to the teacher's outputs."""
    s = Sums()
    cross_x = 0.0
    for xt, xs in zip(x_teacher, x_student):
        s.add(xs)
        cross_x = cross_x + (xt.T @ xs).astype(np.float64)          # Σ x_t x_sᵀ: every reader's cross is W Σ x_t x_sᵀ
    tt = sum((xt.T @ xt).astype(np.float64) for xt in x_teacher)
    out, before, after, total = {}, 0.0, 0.0, 0.0
    for name, w in w_full.items():
        w64 = np.asarray(w, np.float64)
        cross, yy = w64 @ cross_x, float(np.einsum("ij,ij->", w64 @ tt, w64))
        new = ridge(cross, s.gram, w_cut[name], alpha)
        before += fit_error(yy, cross, s.gram, w_cut[name])
        after += fit_error(yy, cross, s.gram, new)
        total += yy
        out[name] = new.astype(np.float32)
    fits.append(Fit(layer, what, before / total, after / total))
    return out


def _choose_heads(st: Sums, w_o: np.ndarray, n_kv: int, q_per_kv: int, full_q: int, full_kv: int, d: int,
                  alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Kept KV groups, then kept query heads (the same count in each kept group), by post-refit error, the
    ridge pulling towards the unpruned o_proj `w_o` as the refit itself does."""
    if n_kv == full_kv and q_per_kv == full_q:
        return np.arange(full_kv), np.arange(full_kv * full_q)
    group_cols = [_cols(np.arange(g * full_q, (g + 1) * full_q), d) for g in range(full_kv)]
    own = w_o @ st.gram                  # Σ y xᵀ for y = the layer's own writes (see refit_model)
    kv = np.asarray(obs_select(own, st.gram, group_cols, n_kv, alpha=alpha, w0=w_o))
    heads = np.concatenate([np.arange(g * full_q, (g + 1) * full_q) for g in kv])
    if q_per_kv < full_q:
        cols = _cols(heads, d)
        sub_cross, sub_gram = own[:, cols], st.gram[np.ix_(cols, cols)]
        owner = [h // full_q for h in heads]

        def removable(alive: set[int], g: int) -> bool:
            return sum(owner[a] == owner[g] for a in alive) > q_per_kv

        keep = obs_select(sub_cross, sub_gram, [np.arange(k * d, (k + 1) * d) for k in range(len(heads))],
                          n_kv * q_per_kv, alpha=alpha, w0=w_o[:, cols], removable=removable)
        heads = heads[keep]
    return kv, heads


__all__ = ["ALPHA", "Fit", "LayerScores", "RefitResult", "Sums", "TeacherStates", "fit_error", "layer_scores",
           "obs_select", "refit_model", "ridge"]
