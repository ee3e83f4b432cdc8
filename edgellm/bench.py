"""Measure edgellm on this device: prompt and decode speed, time to first token with and without
KV-cache reuse, peak memory, and how close decode gets to the memory-bandwidth ceiling.

Figures only mean something next to an anchor measured in the same run, so `run_bench` interleaves
edgellm with raw llama-cpp-python (`llama_cpp.Llama`) rep by rep on the same model and threads, and
reports medians and paired ratios. pp/tg drive the backend directly, like llama.cpp's llama-bench
(pp: one batch of random valid tokens on an empty KV; tg: greedy sample + eval of one token).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .decode_timing import greedy_decode_tps

Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what runs now)

N_CTX = 4096
_TOPICS = ("a vegetable garden", "baking bread", "a bicycle tour", "the night sky", "learning Python",
           "a small flat", "a Raspberry Pi", "a rainy weekend")
_SENTENCES = (
    "Start small and keep notes, because what works in one season rarely works the same way in the next.",
    "Most problems come from doing too many things at once, so change one thing and watch what happens.",
    "A cheap tool that you actually use beats an expensive one that stays in the drawer.",
    "Ask someone who has done it for years; ten minutes of their advice can save you a month.",
    "Plan for the weather, the budget and the time you really have, not the time you wish you had.",
    "Write down what you did and what happened, since memory is kinder than it is accurate.",
    "When something fails, look first at the simplest explanation before reaching for a clever one.",
    "Rest matters as much as effort: tired hands make careless mistakes.",
)
SYSTEM = "You are a patient assistant who answers with practical, concrete advice."
QUESTION = "Write a long, detailed step-by-step guide to planning a week of healthy meals."
FOLLOW_UP = "Thanks. Now summarise the most important point in one sentence."


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def paired_ratio(a: list[float], b: list[float]) -> float | None:
    """Median of per-rep ratios: drift on a noisy machine hits both sides of a pair alike."""
    return _median([x / y for x, y in zip(a, b) if x is not None and y])


def peak_rss_mb() -> float:
    """This process's peak resident set in MB.

    Linux: VmHWM, not ru_maxrss: a process started by fork/vfork + exec inherits its parent's peak in
    ru_maxrss (measured: a child of a 325 MB parent reports 325 MB), which would hide what the restarted
    process really needs. Elsewhere ru_maxrss (bytes on macOS, KiB on other Unixes).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024


def random_tokens(n_vocab: int, n: int, bos: int | None, seed: int = 0) -> list[int]:
    """Random but valid token ids, BOS first when the model wants one (as llama-bench does)."""
    toks = np.random.default_rng(seed).integers(0, n_vocab, size=n).tolist()
    if bos is not None and toks:
        toks[0] = bos
    return toks


# ------------------------------------------------------------------ pp / tg, edgellm vs the anchor


@dataclass
class SpeedBench:
    """An edgellm session and (optionally) a raw `llama_cpp.Llama` on the same model and threads.

    One `round()` measures pp and tg on both, so callers can interleave them with anything else
    (llama-bench in benchmarks/runtime_bench.py) and compare within the same minute of machine noise.
    """

    model: str | os.PathLike[str] | None = None
    threads: int | None = None
    n_prompt: int = 512
    n_gen: int = 128
    anchor: bool = True
    flash_attn: bool | None = None  # None: llama.cpp decides (edgellm.load's default)
    reps: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from . import GREEDY, load

        # speculate=False: the backend's own decode speed is what is compared with llama-bench
        self.session = load(self.model, threads=self.threads, n_ctx=N_CTX, disk_cache=False, sampler=GREEDY,
                            flash_attn=self.flash_attn, speculate=False)
        self.model_path = Path(self.session.model_path)
        self.threads = self.session.plan.threads
        be = self.session.backend
        self.anchor = self.anchor and be.name == "llama.cpp"  # raw llama-cpp-python runs GGUF files only
        self._bos = be.special_token("bos") if be.add_bos() else None
        self._first = self._bos if self._bos is not None else 1
        self.prompt = random_tokens(be.n_vocab, self.n_prompt, self._bos)
        # Same attention kernel on every side: llama.cpp's "auto" turns flash attention on for the CPU,
        # while Llama() defaults to off (FA alone moves pp512 by 8-20% on SmolLM2 here).
        self.fa_on = getattr(getattr(be, "options", None), "flash_attn", None) is not False
        self.llama = None
        if self.anchor:
            import llama_cpp

            self.llama = llama_cpp.Llama(str(self.model_path), n_ctx=N_CTX, n_threads=self.threads,
                                         n_threads_batch=self.threads, flash_attn=self.fa_on, verbose=False)
        self._warm_up()

    def _warm_up(self) -> None:
        """First calls fault in the weights and size buffers; llama-bench also discards one run."""
        short = self.prompt[:32]
        self.edgellm_pp(short), self.edgellm_tg(4)
        if self.llama is not None:
            self.anchor_pp(short), self.anchor_tg(4)

    def edgellm_pp(self, tokens: list[int] | None = None) -> float:
        tokens = tokens or self.prompt
        be = self.session.backend
        self.session.reset()  # the session must not believe its tokens are still in the KV cache
        t0 = time.perf_counter()
        be.eval(tokens)
        dt = time.perf_counter() - t0
        be.truncate(0)
        return len(tokens) / dt

    def edgellm_tg(self, n_gen: int | None = None) -> float:
        """Greedy decode through the native sampler: only the sample + eval steps are timed."""
        return greedy_decode_tps(self.session, n_gen or self.n_gen, self._first)

    def session_decode(self) -> float:
        """Decode tok/s of a real chat answer (template, stop handling, streaming): Stats.decode_tps."""
        self.session.reset()
        done = self.session.chat([{"role": "user", "content": QUESTION}], max_tokens=self.n_gen)
        self.reps.setdefault("session_generated", []).append(done.stats.generated_tokens)
        return done.stats.decode_tps

    def anchor_pp(self, tokens: list[int] | None = None) -> float:
        tokens = tokens or self.prompt
        self.llama.reset()
        t0 = time.perf_counter()
        self.llama.eval(tokens)
        dt = time.perf_counter() - t0
        self.llama.reset()
        return len(tokens) / dt

    def anchor_tg(self, n_gen: int | None = None) -> float:
        """llama-cpp-python's high-level `generate()` loop, greedy; the first (prompt) step is untimed."""
        n = n_gen or self.n_gen
        self.llama.reset()
        gen = self.llama.generate([self._first], top_k=1, temp=0.0, reset=True)
        next(gen)
        t0 = time.perf_counter()
        for _ in range(n):
            next(gen)
        dt = time.perf_counter() - t0
        gen.close()
        self.llama.reset()
        return n / dt

    def round(self, index: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, float]:
        """One interleaved rep; the order flips every round so neither side always runs first."""
        steps = [("pp", self.edgellm_pp), ("tg", self.edgellm_tg), ("session_decode", self.session_decode)]
        if self.llama is not None:
            anchor = [("anchor_pp", self.anchor_pp), ("anchor_tg", self.anchor_tg)]
            steps = [s for pair in zip(steps, anchor) for s in (pair if index % 2 == 0 else pair[::-1])] + steps[2:]
        out = {}
        for name, fn in steps:
            if progress is not None:
                progress(f"{name} (rep {index + 1})")
            out[name] = fn()
            self.reps.setdefault(name, []).append(out[name])
        return out

    def summary(self) -> dict[str, Any]:
        r = self.reps
        out: dict[str, Any] = {"pp_tps": _median(r.get("pp", [])), "tg_tps": _median(r.get("tg", [])),
                               "session_decode_tps": _median(r.get("session_decode", []))}
        if self.llama is not None:
            out["anchor"] = {"name": "llama-cpp-python Llama (high-level)", "flash_attn": self.fa_on,
                             "pp_tps": _median(r["anchor_pp"]), "tg_tps": _median(r["anchor_tg"])}
            out["ratios"] = {"pp_vs_anchor": paired_ratio(r["pp"], r["anchor_pp"]),
                             "tg_vs_anchor": paired_ratio(r["tg"], r["anchor_tg"]),
                             "session_decode_vs_anchor": paired_ratio(r["session_decode"], r["anchor_tg"])}
        return out

    def close(self) -> None:
        if self.llama is not None:
            self.llama.close()
            self.llama = None
        self.session.close()

    def __enter__(self) -> SpeedBench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ time to first token


def build_history(session: Any, n_tokens: int) -> list[dict[str, str]]:
    """A multi-turn conversation of about n_tokens (never more) from fixed text, so runs compare."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i in range(256):
        k = i % len(_SENTENCES)
        pair = [{"role": "user", "content": f"Turn {i + 1}: what should I know about {_TOPICS[i % len(_TOPICS)]}?"},
                {"role": "assistant", "content": " ".join(_SENTENCES[k:] + _SENTENCES[:k])}]
        if len(session.tokenize(session.render(messages + pair, add_generation_prompt=False))) > n_tokens:
            break
        messages += pair
    return messages


def fixed_text(session: Any, n_tokens: int) -> str:
    """About n_tokens (never more) of fixed prose: the shipped system prompt."""
    text = SYSTEM
    for i in range(1024):
        longer = f"{text} {_SENTENCES[i % len(_SENTENCES)]}"
        if len(session.tokenize(longer, special=False)) > n_tokens:
            break
        text = longer
    return text


_PROBE = "from edgellm.bench import _restart_probe; _restart_probe()"


def _restart_probe() -> None:
    """Child side of the restart measurement: load with the disk cache, answer, print Stats as JSON."""
    from . import GREEDY, load

    job = json.loads(sys.stdin.read())
    t0 = time.perf_counter()
    with load(job["model"], threads=job["threads"], n_ctx=job["n_ctx"], disk_cache=job["disk_cache"],
              flash_attn=job["flash_attn"], sampler=GREEDY, speculate=False) as s:
        load_s = time.perf_counter() - t0
        stats = s.chat(job["messages"], max_tokens=job["max_tokens"]).stats
    print(json.dumps({**stats.to_dict(), "load_s": load_s, "peak_rss_mb": peak_rss_mb()}))


def _restart(model: Path, threads: int, flash_attn: bool | None, disk: Path,
             messages: list[dict[str, str]]) -> dict[str, Any]:
    job = {"model": str(model), "threads": threads, "n_ctx": N_CTX, "disk_cache": str(disk), "flash_attn": flash_attn,
           "messages": messages, "max_tokens": 4}
    proc = subprocess.run([sys.executable, "-c", _PROBE], input=json.dumps(job), capture_output=True,
                          text=True, timeout=600, check=False)
    if proc.returncode != 0:
        from .errors import BackendError

        raise BackendError(f"the restart subprocess failed: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_ttft(model: str | os.PathLike[str] | None = None, *, threads: int | None = None,
                 history_tokens: int = 1000, system_tokens: int = 400, n_gen: int = 128, repetitions: int = 3,
                 flash_attn: bool | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """TTFT cold vs warm in-process vs after a restart (disk cache) vs a shipped system-prompt state.

    Each rep: a fresh load with an empty disk cache answers QUESTION after a ~history_tokens chat
    (cold); the disk cache is snapshotted; the same session answers FOLLOW_UP (warm: only the new
    turn is evaluated); a new process answers FOLLOW_UP from the snapshot (restart). Then a first
    question under a ~system_tokens system prompt, with and without its `cache_prompt` state.
    """
    from . import GREEDY, load

    say = progress or (lambda _msg: None)
    reps: dict[str, list[Any]] = {}

    def keep(key: str, value: Any) -> None:
        reps.setdefault(key, []).append(value)

    kw = dict(threads=threads, n_ctx=N_CTX, sampler=GREEDY, flash_attn=flash_attn, speculate=False)
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with load(model, disk_cache=False, **kw) as s:
            model_path, threads = Path(s.model_path), s.plan.threads
            kw["threads"] = threads
            history = build_history(s, history_tokens)
            system = fixed_text(s, system_tokens)
            state = tmp / "system.kv"
            n_system = s.cache_prompt(system, state)
        first_q = [{"role": "system", "content": system}, {"role": "user", "content": "Hello! What can you do?"}]
        for r in range(repetitions):
            disk, snapshot = tmp / f"kv{r}", tmp / f"kv{r}-restart"
            say(f"TTFT cold and warm, rep {r + 1}/{repetitions}")
            with load(model_path, disk_cache=disk, **kw) as s:
                cold = s.chat(history + [{"role": "user", "content": QUESTION}], max_tokens=n_gen)
                shutil.copytree(disk, snapshot) if disk.is_dir() else snapshot.mkdir()
                follow = history + [{"role": "user", "content": QUESTION},
                                    {"role": "assistant", "content": cold.text},
                                    {"role": "user", "content": FOLLOW_UP}]
                warm = s.chat(follow, max_tokens=4).stats
            keep("cold_s", cold.stats.ttft_s), keep("warm_s", warm.ttft_s)
            keep("prompt_tokens", cold.stats.prompt_tokens), keep("history_decode_tps", cold.stats.decode_tps)
            keep("warm_evaluated", warm.prompt_tokens - warm.reused_tokens)
            say(f"TTFT after a restart (new process), rep {r + 1}/{repetitions}")
            child = _restart(model_path, threads, flash_attn, snapshot, follow)
            keep("restart_s", child["ttft_s"]), keep("restart_source", child["cache_source"])
            keep("restart_evaluated", child["prompt_tokens"] - child["reused_tokens"])
            keep("restart_peak_rss_mb", child["peak_rss_mb"]), keep("restart_load_s", child["load_s"])
            say(f"TTFT with a shipped system-prompt state, rep {r + 1}/{repetitions}")
            for shipped in ((True, False) if r % 2 == 0 else (False, True)):
                with load(model_path, disk_cache=False, prompt_state=state if shipped else None, **kw) as s:
                    keep("shipped_s" if shipped else "unshipped_s", s.chat(first_q, max_tokens=4).stats.ttft_s)
    med = {k: _median(v) for k, v in reps.items() if k != "restart_source"}
    return {
        "cold_prompt_tokens": med["prompt_tokens"], "cold_s": med["cold_s"], "warm_s": med["warm_s"],
        "restart_s": med["restart_s"], "warm_vs_cold": paired_ratio(reps["warm_s"], reps["cold_s"]),
        "restart_vs_cold": paired_ratio(reps["restart_s"], reps["cold_s"]),
        "warm_evaluated_tokens": med["warm_evaluated"], "restart_evaluated_tokens": med["restart_evaluated"],
        "restart_cache_source": reps["restart_source"][-1], "restart_load_s": med["restart_load_s"],
        "system_prompt_tokens": n_system, "shipped_state_s": med["shipped_s"], "without_state_s": med["unshipped_s"],
        "shipped_vs_without": paired_ratio(reps["shipped_s"], reps["unshipped_s"]),
        "decode_tps_after_history": med["history_decode_tps"],
        "restart_peak_rss_mb": med["restart_peak_rss_mb"], "reps": reps,
    }


# ------------------------------------------------------------------ the memory-bandwidth ceiling


def measure_bandwidth(threads: int, mib: int = 512, tries: int = 5) -> dict[str, float]:
    """Read bandwidth in GB/s over a `mib` array, best of `tries`: one thread, and the array split
    over `threads` Python threads (numpy releases the GIL in reductions). Decode is bounded by the
    faster. The kernel is max, not sum: numpy's pairwise float32 sum is compute-bound (~4.5 GB/s on
    an AVX-512 Xeon, less than llama.cpp streams), while its SIMD max runs at memory speed."""
    a = np.ones((mib << 20) // 4, dtype=np.float32)  # ones, not empty: the pages must really exist
    nbytes = a.nbytes

    def best(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(tries):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return nbytes / min(times) / 1e9

    chunks = np.array_split(a, max(1, threads))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        single = best(a.max)
        multi = best(lambda: list(pool.map(np.max, chunks)))
    del a
    return {"single_thread_gbs": single, "threads_gbs": multi, "threads": threads, "array_mib": mib,
            "bandwidth_gbs": max(single, multi)}


def bytes_per_token(model_path: Path, kv_tokens: int = 0, kv_type: str = "f16") -> dict[str, int]:
    """Bytes one decode step must read: every weight once (a tied embedding is the output matrix,
    read in full; an untied one is only looked up, one row), plus the KV cache at `kv_tokens`."""
    from .gguf_check import validate_gguf
    from .runtime import kv_cache_bytes

    if Path(model_path).is_dir():  # an ONNX directory
        from .runtime_onnx import onnx_bytes_per_token
        return onnx_bytes_per_token(Path(model_path), kv_tokens)
    info = validate_gguf(model_path)
    sizes = {t.name: t.n_bytes for t in info.tensors}
    weights = sum(sizes.values())
    if "output.weight" in sizes and "token_embd.weight" in sizes:
        vocab = info.hparams().get("vocab_size") or 1
        weights -= sizes["token_embd.weight"] - sizes["token_embd.weight"] // vocab
    kv = kv_cache_bytes(info, kv_tokens, kv_type) if kv_tokens else 0
    return {"file_data_bytes": info.file_size - info.data_offset, "weight_bytes": weights, "kv_bytes": kv,
            "bytes_per_token": weights + kv}


def decode_ceiling(model_path: Path, threads: int, n_gen: int) -> dict[str, Any]:
    """The decode speed memory bandwidth allows: bandwidth / bytes read per token (KV at n_gen/2)."""
    bw = measure_bandwidth(threads)
    need = bytes_per_token(model_path, kv_tokens=n_gen // 2)
    return {"bandwidth": bw, "bytes_per_token": need,
            "ceiling_tps": bw["bandwidth_gbs"] * 1e9 / need["bytes_per_token"]}


def check_ceiling(decode_tps: float, ceiling_tps: float, what: str = "decode") -> float:
    """The share of the bandwidth ceiling `decode_tps` reaches, in %. Over 100 % is impossible for a decoder
    that reads every weight per token: the ceiling is wrong (bandwidth measured too low, or bytes per token
    counted too high), so the benchmark fails instead of printing a share nobody should believe."""
    from .errors import BackendError

    pct = 100 * decode_tps / ceiling_tps
    if pct > 100:
        raise BackendError(f"{what} ran at {decode_tps:.1f} tok/s, {pct:.0f}% of the memory-bandwidth ceiling "
                           f"({ceiling_tps:.3g} tok/s): the ceiling is wrong, so the benchmark reports nothing")
    return pct


# ------------------------------------------------------------------ everything, as the CLI shows it


def run_bench(model: str | os.PathLike[str] | None = None, *, threads: int | None = None, n_prompt: int = 512,
              n_gen: int = 128, repetitions: int = 3, history_tokens: int = 1000, anchor: bool = True,
              flash_attn: bool | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Benchmark edgellm on this device against raw llama-cpp-python; a JSON-ready dict of medians.

    Order: TTFT/cache figures first (edgellm alone, so `peak_rss_mb` is edgellm's own), then pp/tg
    interleaved with the anchor rep by rep, then the bandwidth ceiling (its big array comes last).
    """
    from .device import probe

    total = 2 + 3 * repetitions + repetitions * (5 if anchor else 3)
    done = 0

    def step(msg: str) -> None:
        nonlocal done
        if progress is not None:
            progress(done, total, msg)
        done += 1

    ttft = measure_ttft(model, threads=threads, history_tokens=history_tokens, n_gen=n_gen, flash_attn=flash_attn,
                        system_tokens=min(400, history_tokens), repetitions=repetitions, progress=step)
    rss = peak_rss_mb()
    step("loading edgellm" + (" and llama-cpp-python" if anchor else ""))
    with SpeedBench(model, threads, n_prompt, n_gen, anchor, flash_attn) as sb:
        for r in range(repetitions):
            sb.round(r, step)
        speed, model_path, threads, plan = sb.summary(), sb.model_path, sb.threads, sb.session.plan
        anchor = sb.anchor
    rss_total = peak_rss_mb()
    step("memory bandwidth")
    ceiling = decode_ceiling(model_path, threads, n_gen)
    if progress is not None:
        progress(total, total, "done")
    ratios = {**speed.pop("ratios", {}), "ttft_warm_vs_cold": ttft["warm_vs_cold"],
              "ttft_restart_vs_cold": ttft["restart_vs_cold"], "ttft_shipped_vs_without": ttft["shipped_vs_without"]}
    reps = {**sb.reps, **{f"ttft_{k}": v for k, v in ttft.pop("reps").items()}}
    return {
        "model": str(model_path), "threads": threads, "device": f"{plan.device} · {probe().cpu_model} · {plan.simd}",
        "settings": {"n_prompt": n_prompt, "n_gen": n_gen, "repetitions": repetitions, "history_tokens": history_tokens,
                     "n_ctx": N_CTX, "anchor": anchor, "flash_attn": flash_attn},
        "pp_tps": speed["pp_tps"], "tg_tps": speed["tg_tps"], "session_decode_tps": speed["session_decode_tps"],
        "ttft": ttft, "peak_rss_mb": rss, "peak_rss_with_anchor_mb": rss_total,
        "bandwidth_gbs": ceiling["bandwidth"]["bandwidth_gbs"], **ceiling,
        "pct_of_ceiling": check_ceiling(speed["tg_tps"], ceiling["ceiling_tps"]),
        "anchor": speed.get("anchor"), "ratios": ratios, "reps": reps,
    }
