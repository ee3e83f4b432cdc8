"""Knowledge distillation with torch: the pruned student learns the teacher's next-token distribution.

Runs on a CUDA device when one is present (bf16 autocast, float32 master weights and AdamW state), else on
the CPU in float32; `DistillConfig.device` / `--device` choose explicitly. The same state file resumes on
either.

The teacher's top-k logits come precomputed (kd_data), so the teacher never runs during training. Losses:
forward KL (default; mode-covering, recovers perplexity), reverse KL (mode-seeking) or skew KL
(KL(p || a p + (1-a) q), DistiLLM), all with a temperature. At T = 1 the mass outside the teacher's
top k is one extra bin (from the stored log-sum-exp), so the loss is the exact KL over k + 1 outcomes.

Training stops at a time or token budget; the learning rate follows the fraction of the budget used
(linear warm-up, cosine decay), so a resumed run continues the same schedule. State (weights, AdamW,
step, data position, elapsed time) is saved atomically every few minutes, on Ctrl-C and at the end.

A few sequences of the data are held back (1 in 20, at most 8, when there are 20 or more): their loss is
measured at the start, every couple of minutes and at the end, and the run returns the weights at which
it was lowest. A small KD set is learnt by heart within minutes (16k tokens gone over 45 times made the
student worse on held-out text than the pruned start); the held-back loss sees that and the run never
returns a student worse than the best it passed through.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm.atomic import write_atomic
from edgellm.errors import UsageError

from .checkpoint import Checkpoint
from .kd_data import DEFAULT_RECIPE, KDData, TextRecipe

LOSSES = ("fkl", "rkl", "skl")


@dataclass(frozen=True)
class DistillConfig:
    minutes: float | None = None       # wall-clock training budget (resumed runs count earlier time)
    tokens: int | None = None          # or a token budget; the first reached stops training
    loss: str = "fkl"
    temperature: float = 1.0
    skew: float = 0.1                  # skew KL's mixing weight
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: float = 0.03               # fraction of the budget
    batch: int = 4
    weight_decay: float = 0.0
    seed: int = 0
    save_every_s: float = 120.0
    val_seqs: int | None = None        # sequences held back to pick the best state (None: 1 in 20, at most 8)
    eval_every_s: float = 120.0        # how often the held-back loss is measured
    threads: int | None = None
    device: str = "auto"               # auto (CUDA when present), cpu, cuda or cuda:N
    precision: str = "auto"            # auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise UsageError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if not self.minutes and not self.tokens:
            raise UsageError("give a distillation budget: --minutes or --tokens")
        if (self.minutes is not None and self.minutes <= 0) or (self.tokens is not None and self.tokens <= 0):
            raise UsageError("the distillation budget must be positive")
        if self.temperature <= 0:
            raise UsageError("--temperature must be positive")
        if self.device != "auto" and self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UsageError(f"--precision must be auto, bf16 or fp32, not {self.precision!r}")


def pick_device(cfg: DistillConfig) -> tuple[str, str]:
    """(torch device, precision) for a run: CUDA with bf16 autocast when present (or asked for), else CPU fp32."""
    import torch

    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device here (install a CUDA build of torch, or use "
                             "--device cpu)")
        index = int(want.split(":")[1]) if ":" in want else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {want}: only {torch.cuda.device_count()} CUDA device(s) here")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if want.startswith("cuda") else "fp32")
    if precision == "bf16" and want.startswith("cuda") and not torch.cuda.is_bf16_supported():
        precision = "fp32"   # pre-Ampere GPUs: bf16 autocast would be emulated, slower than fp32
    return want, precision


@dataclass
class DistillResult:
    steps: int
    tokens: int
    seconds: float                 # training time, all runs of a resumed job together
    first_loss: float | None
    last_loss: float | None        # mean over the last 10 steps
    resumed_from_step: int
    state_path: str
    device: str = "cpu"            # where it trained, e.g. "cuda:0 (NVIDIA H100 80GB HBM3), bf16" or "cpu, fp32"
    val_curve: list = dataclasses.field(default_factory=list)   # [step, held-back loss] pairs
    best_step: int | None = None   # the step whose weights were returned (None: no held-back sequences)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def kd_loss(logits, ids, t_logits, t_lse, *, kind: str = "fkl", temperature: float = 1.0, skew: float = 0.1):
    """Mean per-token divergence between the teacher (top-k + lse) and the student's full logits."""
    import torch

    T = temperature
    s_lp = torch.log_softmax(logits.float() / T, dim=-1).gather(-1, ids.long())     # (B, L, k)
    if T == 1.0:   # exact over the top k plus one bin for the rest of the vocabulary
        t_lp = t_logits - t_lse.unsqueeze(-1)
        tail = lambda lp: torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-6)).unsqueeze(-1)  # noqa: E731
        t_lp, s_lp = torch.cat([t_lp, tail(t_lp)], -1), torch.cat([s_lp, tail(s_lp)], -1)
    else:          # the tail's mass at T != 1 is unknown: both sides renormalised over the top k
        t_lp = torch.log_softmax(t_logits / T, dim=-1)
        s_lp = torch.log_softmax(s_lp, dim=-1)
    p, q = t_lp.exp(), s_lp.exp()
    if kind == "fkl":
        div = (p * (t_lp - s_lp)).sum(-1)
    elif kind == "rkl":
        div = (q * (s_lp - t_lp)).sum(-1)
    else:
        mix = torch.log(skew * p + (1 - skew) * q + 1e-30)
        div = (p * (t_lp - mix)).sum(-1)
    return div.mean() * T * T


def _fingerprint(ckpt: Checkpoint) -> str:
    """Identifies the student's starting weights: config plus a sample of every tensor."""
    h = hashlib.sha256(repr(ckpt.config).encode())
    for name, w in ckpt.tensors:
        flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
        h.update(name.encode() + flat[:: max(1, flat.size // 4096)].tobytes())
    return h.hexdigest()[:16]


def _lr(cfg: DistillConfig, frac: float) -> float:
    if frac < cfg.warmup:
        return cfg.lr * max(frac / cfg.warmup, 0.02)
    t = min(1.0, (frac - cfg.warmup) / max(1e-9, 1 - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _save(path: Path, state: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())


def distill(student: Checkpoint, data: KDData, cfg: DistillConfig, work_dir: Path, *,
            progress: Callable[[dict], None] | None = None) -> tuple[Checkpoint, DistillResult]:
    """Train `student` towards the teacher's logits in `data`; resumes from `work_dir`'s state when it matches."""
    import torch

    from .torch_llama import from_torch, to_torch

    cfg.check()
    if student.config.vocab_size <= int(data.topk_ids.max()):
        raise UsageError(f"the student's vocabulary ({student.config.vocab_size}) is smaller than the teacher's "
                         "token ids: distillation needs the same tokenizer")
    device, precision = pick_device(cfg)
    if device == "cpu":
        torch.set_num_threads(cfg.threads or torch.get_num_threads())
    torch.manual_seed(cfg.seed)
    key = (f"{_fingerprint(student)}-{data.key}-{cfg.loss}-{cfg.temperature}-{cfg.batch}-{cfg.lr}-{cfg.seed}"
           f"-{cfg.val_seqs}")
    state_path = Path(work_dir) / "distill-state.pt"
    model = to_torch(student).to(device)    # float32 master weights; bf16 only inside autocast
    model.train()
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")
    where = (f"{device} ({torch.cuda.get_device_name(device)}), {precision}" if device.startswith("cuda")
             else f"cpu, {precision}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    step, n_tok, elapsed, losses, first, st = 0, 0, 0.0, [], None, None
    if state_path.exists():
        try:
            st = torch.load(state_path, map_location=device, weights_only=False)
        except Exception:  # noqa: BLE001 - a corrupt state file is ignored, never trusted
            st = None
        if st is not None and st.get("key") == key:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optim"])
            step, n_tok, elapsed, first = st["step"], st["tokens"], st["elapsed"], st["first_loss"]
            losses = list(st.get("recent", []))
    resumed = step
    n_all, seq_len = data.tokens.shape
    n_val = cfg.val_seqs if cfg.val_seqs is not None else (min(8, n_all // 20) if n_all >= 20 else 0)
    if not 0 <= n_val < n_all:
        raise UsageError(f"cannot hold back {n_val} of {n_all} training sequences for validation")
    n_seq = n_all - n_val                  # the last n_val sequences are only measured, never trained on
    per_step = cfg.batch * seq_len
    curve: list = list(st.get("val_curve", [])) if resumed else []
    best: dict | None = st.get("best") if resumed else None

    def batch_loss(b: np.ndarray):
        """The KD loss of sequences `b`: the model under autocast, the loss itself in float32."""
        def on(a: np.ndarray):
            return torch.from_numpy(a[b]).to(device)

        with autocast:
            logits = model(input_ids=on(data.tokens)).logits
        return kd_loss(logits, on(data.topk_ids), on(data.topk_logits), on(data.lse), kind=cfg.loss,
                       temperature=cfg.temperature, skew=cfg.skew)

    def val_loss() -> float:
        with torch.no_grad():
            return sum(float(batch_loss(np.arange(s, min(n_all, s + cfg.batch)))) * min(cfg.batch, n_all - s)
                       for s in range(n_seq, n_all, cfg.batch)) / n_val

    def measure() -> None:
        nonlocal best
        if not n_val or (curve and curve[-1][0] == step):
            return
        v = val_loss()
        curve.append([step, v])
        if best is None or v < best["loss"]:
            best = {"loss": v, "step": step,
                    "weights": {k: w.detach().to("cpu", copy=True) for k, w in model.state_dict().items()}}
    budget_s = cfg.minutes * 60 if cfg.minutes else math.inf
    budget_tok = cfg.tokens or math.inf

    def frac() -> float:
        return min(1.0, max(elapsed / budget_s, n_tok / budget_tok))

    def batch_of(s: int) -> np.ndarray:
        idx = []
        for j in range(s * cfg.batch, (s + 1) * cfg.batch):
            epoch, pos = divmod(j, n_seq)
            idx.append(np.random.default_rng(cfg.seed + epoch).permutation(n_seq)[pos])
        return np.asarray(idx)

    def snapshot() -> None:
        _save(state_path, {"key": key, "model": model.state_dict(), "optim": opt.state_dict(), "step": step,
                           "tokens": n_tok, "elapsed": elapsed, "first_loss": first, "recent": losses[-10:],
                           "val_curve": curve, "best": best})

    last_save = last_eval = time.perf_counter()
    measure()
    try:
        while frac() < 1.0:
            t0 = time.perf_counter()
            b = batch_of(step)
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, frac())
            loss = batch_loss(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step, n_tok = step + 1, n_tok + per_step
            value = loss.item()      # waits for the device: the step's time below is its real time
            dt = time.perf_counter() - t0
            elapsed += dt
            first = value if first is None else first
            losses.append(value)
            if progress:
                rate = per_step / dt
                eta = min(budget_s - elapsed, (budget_tok - n_tok) / rate)
                progress({"step": step, "tokens": n_tok, "loss": value, "tok_s": rate, "eta_s": max(0.0, eta),
                          "frac": frac(), "lr": opt.param_groups[0]["lr"]})
            if time.perf_counter() - last_eval > cfg.eval_every_s:
                measure()          # not counted in `elapsed`: the budget is training time
                last_eval = time.perf_counter()
            if time.perf_counter() - last_save > cfg.save_every_s:
                snapshot()
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        snapshot()
        raise
    measure()
    snapshot()
    if best is not None and best["step"] != step:
        model.load_state_dict(best["weights"])
    model.eval()
    result = DistillResult(step, n_tok, elapsed, first, float(np.mean(losses[-10:])) if losses else None,
                           resumed, str(state_path), where, curve, best["step"] if best else None)
    return from_torch(model, student.config, student), result


# -- end to end --------------------------------------------------------------------------------------------
def teacher_gguf(spec: str | Path) -> Path:
    """The teacher as a GGUF llama.cpp can run (a HF directory is written once as F16 into the cache)."""
    from edgellm import store

    from .kd_data import cache_dir

    ref = store.resolve(spec)
    if ref.kind == "gguf":
        return Path(ref.path)
    if ref.kind != "hf":
        raise UsageError(f"the teacher must be a GGUF file or a Hugging Face directory, not {ref.kind}")
    from .gguf_writer import write_gguf
    from .hf_source import read_hf

    st = (Path(ref.path) / "config.json").stat()
    key = hashlib.sha256(f"{Path(ref.path).resolve()}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_dir() / f"teacher-{key}.gguf"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(read_hf(ref.path), dest, "F16")
    return dest


def check_vocab(student: Checkpoint, teacher: Path) -> None:
    from .gguf_source import read_gguf_tokenizer

    t = read_gguf_tokenizer(teacher)
    if student.tokenizer.tokens != t.tokens:
        raise UsageError(f"the student's vocabulary ({len(student.tokenizer.tokens)} tokens) differs from the "
                         f"teacher's ({len(t.tokens)}): distillation needs the same tokenizer")


def evaluate_student(ckpt: Checkpoint, teacher: Path, work_dir: Path, name: str, *, chunks: int | None = 8,
                     threads: int | None = None) -> dict:
    """Held-out perplexity and KL divergence to the teacher, in llama.cpp, of `ckpt` written as F16 GGUF."""
    from edgellm.texts import heldout_text

    from .evaluate import evaluate
    from .gguf_writer import write_gguf

    path = Path(work_dir) / f"{name}.gguf"
    write_gguf(ckpt, path, "F16")
    try:
        res = evaluate(path, teacher, heldout_text(), threads=threads, max_chunks=chunks)
    finally:
        path.unlink(missing_ok=True)
    return {"perplexity": res.perplexity, "teacher_perplexity": res.ref_perplexity, "mean_kld": res.mean_kld,
            "top1_agreement": res.top1_agreement, "tokens_scored": res.tokens_scored}


def distill_model(student: Checkpoint, teacher: str | Path, cfg: DistillConfig, *, text: str | None = None,
                  work_dir: Path | None = None, top_k: int = 32, seq_len: int = 256, gen_tokens: int = 16384,
                  evaluate: bool = True, eval_chunks: int | None = 8, recipe: TextRecipe = DEFAULT_RECIPE,
                  progress: Callable[[str, int, int], None] | None = None,
                  on_step: Callable[[dict], None] | None = None) -> tuple[Checkpoint, dict]:
    """Distill `student` from `teacher` (a model spec): data, training, and held-out figures before/after.

    work_dir holds the resumable state; by default one per (student, teacher) under EDGELLM_HOME/distill.
    """
    from .kd_data import build_kd_data, cache_dir

    cfg.check()
    tpath = teacher_gguf(teacher)
    check_vocab(student, tpath)
    t0 = time.perf_counter()
    data, source = build_kd_data(tpath, text, k=top_k, seq_len=seq_len, gen_tokens=gen_tokens, seed=cfg.seed,
                                 threads=cfg.threads, recipe=recipe, progress=progress)
    t_data = time.perf_counter() - t0
    work = Path(work_dir) if work_dir else cache_dir() / f"run-{_fingerprint(student)}-{data.key}"
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"teacher": str(tpath), "training_text": source, "training_tokens": data.n_tokens,
                    "top_k": top_k, "seq_len": seq_len, "data_seconds": t_data, "work_dir": str(work)}
    if evaluate:
        report["before"] = evaluate_student(student, tpath, work, "before", chunks=eval_chunks, threads=cfg.threads)
    trained, res = distill(student, data, cfg, work, progress=on_step)
    report["training"] = res.to_dict()
    if evaluate:
        report["after"] = evaluate_student(trained, tpath, work, "after", chunks=eval_chunks, threads=cfg.threads)
    return trained, report
