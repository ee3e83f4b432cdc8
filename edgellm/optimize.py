"""`edgellm optimize`: measure which way of running a model is fastest on *this* device, within a quality
bound, and remember the answer.

No peer does this: llama.cpp, Ollama, MLC and onnxruntime-genai all run what they are given. Here the
candidates for a GGUF file are the file itself on llama.cpp (on a CPU also with llama.cpp's flash attention,
which is faster or slower than its default kernel depending on the CPU and the depth) and its blocks carried
into a fused ONNX graph without re-rounding (converters/gguf_onnx.py: 'lossless'), plus, for the 'balanced'
bound, edgellm's calibrated int4 ONNX export. Each candidate's quality is measured as mean KL divergence to
the source file (run by llama.cpp, as the user had it) on the shipped held-out text; those within the bound
are timed on this device — a short chat's time to first token and decode, a short turn's prefill and decode
after 768 tokens of context, and a long prefill, twice, interleaved, one candidate loaded at a time — and
the one that answers a shallow and a deep turn soonest wins (Candidate.conversation_tps). The
decision and its figures are kept in the store, keyed by the model's content fingerprint, the device profile
and the library versions: a later `edgellm chat` pays nothing, and an upgrade or another device measures
again.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import store
from .errors import BackendError, UsageError

QUALITY = {"lossless": 0.005, "balanced": 0.05}   # bound on mean KLD to the source file, held-out text
# the transcoded graph's form, part of the decision's key and of the artifact's directory: 2 = float zero
# points (Q4_1, Q4_K) as integer blocks plus per-block offsets (converters/onnx_graph.py, offset_linear)
TRANSCODE_FORMAT = 2
# 2: decode timed shallow and deep; 3: a flash-attention candidate and ranking by whole turns (older ones measure again)
DECISION_FORMAT = 3
DEFAULT_QUALITY = "balanced"
BUSY = 0.25   # other processes' share of the CPUs above which the timings are called shaky (2 threads on 2 cores)
Progress = Callable[[str], None]


@dataclass
class Candidate:
    name: str                    # 'llama.cpp' | 'llama.cpp-fa' | 'onnx-lossless' | 'onnx-int4'
    backend: str                 # 'llama.cpp' | 'onnxruntime'
    path: str
    size_bytes: int = 0
    mean_kld: float | None = None
    decode_tps: float | None = None       # a short chat's answer (KV depth ~30-130)
    prefill_tps: float | None = None
    ttft_s: float | None = None
    excluded: str | None = None  # why it is not eligible (over the bound, could not be built)
    deep_decode_tps: float | None = None  # greedy decode after DEEP_TOKENS of context
    turn_prefill_s: float | None = None   # a TURN_TOKENS user turn's prefill after DEEP_TOKENS of context
    flash_attn: bool | None = None        # llama.cpp candidates: its flash-attention kernel on (None: load()'s default)

    @property
    def conversation_tps(self) -> float:
        """What the choice ranks by: answered tokens per second over a modelled two-turn chat — a short chat's
        time to first token and DECODE_TOKENS decoded, then a TURN_TOKENS turn's prefill and DECODE_TOKENS
        decoded after DEEP_TOKENS of context. Why whole turns at both depths: backends' attention grows
        differently with depth (the transcoded ONNX graph wins a short chat and loses after ~900 tokens on one
        CPU), and llama.cpp's flash attention decodes faster on another CPU while prefilling a short turn over a
        deep cache slower — ranked by decode alone it would win without that cost being seen. A figure not
        measured counts as no time (decode alone)."""
        if not self.decode_tps:
            return 0.0
        seconds = (self.ttft_s or 0.0) + DECODE_TOKENS / self.decode_tps
        if not self.deep_decode_tps:
            return DECODE_TOKENS / seconds
        seconds += (self.turn_prefill_s or 0.0) + DECODE_TOKENS / self.deep_decode_tps
        return 2 * DECODE_TOKENS / seconds


@dataclass
class Decision:
    source: str
    fingerprint: str
    quality: str
    kld_bound: float
    device: str
    versions: dict[str, str]
    candidates: list[Candidate]
    winner: str
    seconds: float
    measured_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    load: float = 0.0   # the share of the CPUs other processes used while measuring: above BUSY the figures are shaky

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.name == self.winner)

    def reason(self) -> str:
        """One line for plans and banners: what won, by how much, measured how."""
        win = self.chosen
        others = [c for c in self.candidates if c.name != win.name and c.decode_tps]
        vs = ", ".join(f"{c.name} {_decode_figures(c)}" for c in others) or "no other candidate within the bound"
        busy = f", other processes using {self.load:.0%} of the CPUs" if self.load > BUSY else ""
        return (f"measured on this device ({self.measured_at}{busy}): {win.name} decodes {_decode_figures(win)} "
                f"(prefill {win.prefill_tps:.0f} tok/s, TTFT {1000 * win.ttft_s:.0f} ms) vs {vs}; "
                f"quality {self.quality} (KLD to the source ≤ {self.kld_bound})")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reason": self.reason()}


def _decode_figures(c: Candidate) -> str:
    deep = f" ({c.deep_decode_tps:.0f} after {DEEP_TOKENS} tokens)" if c.deep_decode_tps else ""
    return f"{c.decode_tps:.0f} tok/s{deep}, {c.conversation_tps:.0f} over whole turns"


def versions() -> dict[str, str]:
    """What changes speed or numerics: edgellm, llama-cpp-python, onnxruntime (absent: not installed)."""
    from importlib import metadata

    out = {"transcode-format": str(TRANSCODE_FORMAT), "decision-format": str(DECISION_FORMAT)}
    for dist in ("edgellm", "llama_cpp_python", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_key() -> str:
    """The device as far as speed goes: CPU model and features, cores, RAM to the GiB, OS and arch."""
    from .device import probe

    p = probe()
    return (f"{p.os}/{p.arch} {p.cpu_model} | {','.join(sorted(p.features))} | {p.logical_cores} logical, "
            f"{p.performance_cores} performance | {p.ram_bytes >> 30} GiB | {platform.python_version()}")


def onnx_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "tokenizers"))


def _fingerprint(path: Path) -> str:
    from .fingerprint import gguf_fingerprint
    from .gguf_check import validate_gguf

    return gguf_fingerprint(path, validate_gguf(path).data_offset)


def _work_dir(fingerprint: str, quality: str) -> Path:
    return store.home() / "optimized" / f"{fingerprint[:16]}-{quality}"


def cached(model: str | os.PathLike[str] | None, quality: str = DEFAULT_QUALITY) -> Decision | None:
    """The stored decision for `model` if it was measured for this content, device and library versions
    (and its artifacts are still there); None otherwise."""
    ref = store.resolve(model)
    if ref.kind != "gguf":
        return None
    fp = _fingerprint(ref.path)
    return _read(_work_dir(fp, quality) / "decision.json", fp, quality)


def _read(path: Path, fingerprint: str, quality: str) -> Decision | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw.pop("reason", None)
        raw["candidates"] = [Candidate(**c) for c in raw["candidates"]]
        d = Decision(**raw)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if (d.fingerprint, d.quality, d.device, d.versions) != (fingerprint, quality, device_key(), versions()):
        return None   # another model, bound, device or library version: measure again
    if not Path(d.chosen.path).exists():
        return None
    return d


def optimize(model: str | os.PathLike[str] | None = None, *, quality: str = DEFAULT_QUALITY,
             threads: int | None = None, force: bool = False, progress: Progress | None = None) -> Decision:
    """Build the candidates for `model` (a GGUF), keep those within the quality bound, time them here, and
    store the decision (see the module doc). A stored decision for the same content, device and versions is
    returned at once unless `force`."""
    if quality not in QUALITY:
        raise UsageError(f"--quality must be one of {', '.join(QUALITY)}, not {quality!r}")
    if not onnx_available():
        raise BackendError("edgellm optimize compares llama.cpp with onnxruntime: install the onnx extra "
                           "(pip install 'edgellm[onnx]')")
    ref = store.resolve(model)
    if ref.kind != "gguf":
        raise UsageError(f"{ref.path} is a {ref.kind} model: optimize starts from a GGUF file")
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    fp = _fingerprint(ref.path)
    work = _work_dir(fp, quality)
    if not force and (hit := _read(work / "decision.json", fp, quality)) is not None:
        return hit
    work.mkdir(parents=True, exist_ok=True)
    clock = _cpu_clock()
    cands = _build(ref.path, work, quality, say)
    bound = QUALITY[quality]
    scored = [c for c in cands if c.excluded is None and (c.backend != "llama.cpp" or c.flash_attn is not None)]
    if scored:
        say(f"quality of {', '.join(c.name for c in scored)}: KL divergence to the source on held-out text")
    for c, kld in zip(scored, _kld(scored, ref.path, threads), strict=True):
        c.mean_kld = kld
        if kld > bound:
            c.excluded = f"mean KLD {kld:.4f} to the source is over the {quality} bound {bound}"
    cands[0].mean_kld = 0.0   # the source itself, run as load() runs it
    _time_all([c for c in cands if c.excluded is None], threads, say)
    eligible = [c for c in cands if c.excluded is None and c.decode_tps]
    winner = max(eligible, key=lambda c: (c.conversation_tps, c.prefill_tps or 0.0))
    decision = Decision(str(ref.path), fp, quality, bound, device_key(), versions(), cands, winner.name,
                        round(time.perf_counter() - t0, 1), load=_busy(clock))
    if decision.load > BUSY:
        say(f"note: other processes used {decision.load:.0%} of the CPUs while measuring: re-run "
            "`edgellm optimize --force` on an idle machine for a sounder choice")
    from .atomic import write_atomic

    write_atomic(work / "decision.json", json.dumps(decision.to_dict(), indent=1).encode())
    return decision


def _cpu_clock() -> tuple[float, float | None, float]:
    """(wall s, CPU-seconds every process on the machine has run — None off Linux —, this process's own)."""
    from .device import cpu_busy_seconds

    own = sum(os.times()[:2])   # user + system of every thread here (llama.cpp's and onnxruntime's too)
    return time.monotonic(), cpu_busy_seconds(), own


def _busy(since: tuple[float, float | None, float]) -> float:
    """The share of the CPUs *other* processes used since `since` (a _cpu_clock()): what makes the timings shaky.
    Why not the load average: it counts optimize's own threads, so a 2-thread run on 2 cores read as 'busy'
    every time. Off Linux, the load average less this process's own share."""
    wall, machine, own = (b - a if a is not None and b is not None else None for a, b in zip(since, _cpu_clock()))
    cpus = os.cpu_count() or 1
    if not wall:
        return 0.0
    if machine is not None:
        return round(max(0.0, (machine - own) / (wall * cpus)), 2)
    try:
        return round(max(0.0, os.getloadavg()[0] / cpus - own / (wall * cpus)), 2)
    except OSError:
        return 0.0


def _build(gguf: Path, work: Path, quality: str, say: Progress) -> list[Candidate]:
    from .converters.gguf_onnx import transcode
    from .device import probe

    cands = [Candidate("llama.cpp", "llama.cpp", str(gguf), gguf.stat().st_size)]
    if not probe().metal:   # on the CPU load() runs llama.cpp without flash attention (on Metal it is on)
        cands.append(Candidate("llama.cpp-fa", "llama.cpp", str(gguf), gguf.stat().st_size, flash_attn=True))
    lossless = work / f"onnx-lossless-v{TRANSCODE_FORMAT}"
    c = Candidate("onnx-lossless", "onnxruntime", str(lossless))
    if not (lossless / "model.onnx").is_file():
        say("building the transcoded ONNX graph (GGUF blocks carried over, no re-rounding)")
        try:
            transcode(gguf, lossless, mode="lossless")
        except Exception as e:  # noqa: BLE001 - a candidate that cannot be built is reported, not fatal
            c.excluded = str(e)
    cands.append(c)
    if quality == "balanced":
        int4 = work / "onnx-int4"
        c = Candidate("onnx-int4", "onnxruntime", str(int4))
        if not (int4 / "model.onnx").is_file():
            say("building the calibrated int4 ONNX graph (GPTQ 4-bit blocks of 64)")
            try:
                from .converters.onnx_export import convert_to_onnx

                convert_to_onnx(str(gguf), int4, quant="int4")
            except Exception as e:  # noqa: BLE001
                c.excluded = str(e)
        cands.append(c)
    for c in cands:
        p = Path(c.path)
        c.size_bytes = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.glob("model.onnx*"))
    return cands


def _kld(cands: list[Candidate], source: Path, threads: int | None) -> list[float]:
    """Each candidate's mean KLD to the source file (run as load() runs it), the source evaluated once."""
    from .converters.evaluate import evaluate_many
    from .texts import heldout_text

    if not cands:
        return []
    opts = [{} if c.flash_attn is None else {"flash_attn": c.flash_attn} for c in cands]
    return [round(r.mean_kld, 6) for r in evaluate_many([c.path for c in cands], source, heldout_text(), ctx=512,
                                                       threads=threads, max_chunks=2, load_options=opts)]


DECODE_TOKENS, PREFILL_TOKENS, DEEP_TOKENS, DEEP_DECODE, TURN_TOKENS = 96, 512, 768, 48, 25
TIMING_ROUNDS = 2


def _time_all(cands: list[Candidate], threads: int | None, say: Progress) -> None:
    """Time every candidate TIMING_ROUNDS times, interleaved (the order reversed each round, one candidate
    loaded at a time), keeping each figure's best. Why interleaved: this VM's speed drifts by 20-30 % within
    minutes; timing one candidate after the other let a slow minute decide (a lossless choice here went to
    llama.cpp on a 135 tok/s outlier while every benchmark round had the graph ahead)."""
    for r in range(TIMING_ROUNDS):
        for c in cands if r % 2 == 0 else cands[::-1]:
            say(f"timing {c.name} on this device ({r + 1}/{TIMING_ROUNDS})")
            t = _time(c.path, threads, c.flash_attn)
            for rate in ("decode_tps", "prefill_tps", "deep_decode_tps"):     # best of the rounds
                setattr(c, rate, max(getattr(c, rate) or 0.0, getattr(t, rate)))
            for span in ("ttft_s", "turn_prefill_s"):
                setattr(c, span, min(getattr(c, span) or float("inf"), getattr(t, span)))


@dataclass(frozen=True)
class Timing:
    """One try of each figure optimize ranks by (see Candidate)."""
    decode_tps: float
    prefill_tps: float
    ttft_s: float
    deep_decode_tps: float
    turn_prefill_s: float


def _time(path: str, threads: int | None, flash_attn: bool | None = None) -> Timing:
    """One try each: a short chat's TTFT and decode, a PREFILL_TOKENS prompt's prefill into an empty cache, and
    after DEEP_TOKENS of text the greedy decode and a TURN_TOKENS turn's prefill."""
    from . import GREEDY, load
    from .decode_timing import greedy_decode_tps
    from .texts import heldout_text

    # speculate=False: the backends are compared on their own decode (prompt lookup applies to either)
    with load(path, n_ctx=1024, threads=threads, disk_cache=False, sampler=GREEDY, speculate=False,
              flash_attn=flash_attn) as s:
        text = s.tokenize(heldout_text())
        question = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
        s.memory_cache = type(s.memory_cache)(0)   # cold: nothing reused
        done = s.chat(question, max_tokens=DECODE_TOKENS).stats
        s.reset()
        context = text[:DEEP_TOKENS - 1]
        t0 = time.perf_counter()
        s.prefill(context[:PREFILL_TOKENS])   # as llama-bench's pp512: a prompt into an empty cache
        prefill = PREFILL_TOKENS / (time.perf_counter() - t0)
        s.prefill(context)                    # the rest, untimed: the decode below runs at depth
        deep = greedy_decode_tps(s, DEEP_DECODE, text[DEEP_TOKENS - 1], context)
        t0 = time.perf_counter()
        s.prefill(text[:DEEP_TOKENS - 1 + TURN_TOKENS])   # the context is kept: only the turn is evaluated
        turn = time.perf_counter() - t0
    return Timing(round(done.decode_tps, 1), round(prefill, 1), round(done.ttft_s, 4), round(deep, 1), round(turn, 4))


def load_optimized(path: Path, *, quality: str, pinned: str | None, device: str, n_ctx: int, threads: int | None,
                   check_memory: bool, session_kw: dict, llama_options: dict):
    """The Session edgellm.load(optimize=True / backend='onnx') opens, or None to load the GGUF as usual.

    llama.cpp-only options (several sequences, RPC workers, a KV type, flash attention on) keep the model on
    llama.cpp, which alone has them; so does a missing onnx extra (unless onnx was pinned). flash_attn=False
    keeps the measured choice but not flash attention: a llama.cpp-fa winner runs as plain llama.cpp."""
    import dataclasses

    from .runtime_gguf import load_gguf
    from .runtime_onnx import load_onnx

    special = [k for k, v in llama_options.items() if v not in (1, None, "f16", False)]
    if pinned != "onnx" and (special or not onnx_available()):
        return None
    if special:
        raise UsageError(f"{', '.join(special)}: llama.cpp options; the onnx backend runs one sequence with the "
                         "graph's own KV cache")
    decision = optimize(path, quality=quality, threads=threads)
    chosen = decision.chosen
    if pinned == "onnx" and chosen.backend != "onnxruntime":
        onnx = [c for c in decision.candidates if c.backend == "onnxruntime" and c.excluded is None]
        if not onnx:
            raise BackendError(f"no ONNX form of {path.name} is within the {quality} bound: "
                               + "; ".join(f"{c.name}: {c.excluded}" for c in decision.candidates if c.excluded))
        chosen = max(onnx, key=lambda c: c.conversation_tps)
    if chosen.flash_attn and llama_options.get("flash_attn") is False:
        chosen = next(c for c in decision.candidates if c.name == "llama.cpp")
    why = decision.reason() if chosen.name == decision.winner else f"pinned: {chosen.name} ({decision.reason()})"
    if chosen.backend == "onnxruntime":
        session = load_onnx(Path(chosen.path), device=device, n_ctx=n_ctx, threads=threads,
                            check_memory=check_memory, session_kw=session_kw)
    else:
        session = load_gguf(path, device=device, n_ctx=n_ctx, threads=threads, check_memory=check_memory,
                            session_kw=session_kw, flash_attn=chosen.flash_attn)
    session.plan = dataclasses.replace(session.plan, reasons=(why, *session.plan.reasons))
    session.optimized = decision
    return session


def wanted(flag: bool | None = None) -> bool:
    """Whether the CLI's chat, run and serve optimize: on unless --no-optimize or EDGELLM_OPTIMIZE=0."""
    if flag is not None:
        return flag
    return os.environ.get("EDGELLM_OPTIMIZE", "1").strip().lower() not in ("0", "off", "false", "no")
