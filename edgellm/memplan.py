"""Memory planner: how much RAM a model needs at a context size and KV type, and whether a board has it.

Peak resident memory of a running session, part by part (figures for SmolLM2-135M measured on x86-64 in
benchmarks/memplan_accuracy.py; the parts scale with the model's own dimensions):
- weights: the GGUF is mmap'd and every tensor is read per token, so the whole file becomes resident;
- KV cache: llama.cpp allocates and clears all n_ctx cells at load, so all of it is resident at once;
- compute: what a long prompt makes resident of llama.cpp's compute buffer — one micro-batch (n_ubatch
  tokens) at full depth: activations plus, without flash attention, the f32 attention scores and mask over
  every cached position and the CPU backend's f16 copy of the scores (its work buffer) — and the logits
  rows. llama.cpp *allocates* more (`compute_buffer_bytes`: its worst-case graph also holds n_ubatch rows
  of logits), but pages a session never writes stay untouched and are not resident;
- state cache: KV snapshots kept for reuse (the session stashes the live context when a conversation
  switches; one full-context snapshot is as large as the KV cache);
- runtime: Python, numpy, llama.cpp's libraries and threads, the tokenizer.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import InsufficientMemoryError, UsageError
from .gguf_check import GGUFInfo, validate_gguf
from .plan import FIT_FRACTION, RUNTIME_OVERHEAD_BYTES

MiB = 1 << 20
GiB = 1 << 30
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
            "q5_0": 22 / 32, "q5_1": 24 / 32}
N_UBATCH = 512  # LlamaOptions.n_ubatch: the largest micro-batch the graph is built for
KV_PAD = 256  # llama.cpp pads the attended KV length to 256 cells
# starlette, uvicorn, asyncio and the engine thread: an `edgellm serve` process peaked 12 MiB above a
# plain session answering the same two requests (ctx 1024, x86-64); rounded up
SERVER_OVERHEAD_BYTES = 16 * MiB
# Quant types to suggest when a file is too large, with llama.cpp's bits per weight.
SMALLER_QUANTS = (("Q8_0", 8.5), ("Q6_K", 6.56), ("Q5_K_M", 5.7), ("Q4_K_M", 4.89), ("Q4_0", 4.5),
                  ("Q3_K_M", 3.91), ("Q2_K", 3.35))


@dataclass(frozen=True)
class Board:
    """A device class with its memory as seen by a service, after the OS has taken its share."""

    name: str
    ram_bytes: int
    usable_bytes: int  # RAM left for us on a headless Raspberry Pi OS Lite (64-bit) after boot
    cpu: str
    cores: int
    llama_cpu_flags: tuple[str, ...]  # CMake flags that build llama.cpp for this CPU
    dotprod: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["llama_cpu_flags"] = list(self.llama_cpu_flags)
        return d


_A72 = ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8-a+crc", "-DCMAKE_C_FLAGS=-mcpu=cortex-a72",
        "-DCMAKE_CXX_FLAGS=-mcpu=cortex-a72")
_A76 = ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16", "-DCMAKE_C_FLAGS=-mcpu=cortex-a76",
        "-DCMAKE_CXX_FLAGS=-mcpu=cortex-a76")
_A53 = ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8-a+crc", "-DCMAKE_C_FLAGS=-mcpu=cortex-a53",
        "-DCMAKE_CXX_FLAGS=-mcpu=cortex-a53")
# Usable = what `free` reports as available on an idle Raspberry Pi OS Lite Bookworm (64-bit):
# the firmware reserves the GPU/CMA carve-out and the OS, systemd and sshd take ~150-250 MB.
BOARDS: dict[str, Board] = {b.name: b for b in (
    Board("zero2w", 512 * MiB, 330 * MiB, "cortex-a53", 4, _A53),
    Board("pi4-2gb", 2 * GiB, 1600 * MiB, "cortex-a72", 4, _A72),
    Board("pi4-4gb", 4 * GiB, 3500 * MiB, "cortex-a72", 4, _A72),
    Board("pi4-8gb", 8 * GiB, 7500 * MiB, "cortex-a72", 4, _A72),
    Board("pi5-4gb", 4 * GiB, 3500 * MiB, "cortex-a76", 4, _A76, dotprod=True),
    Board("pi5-8gb", 8 * GiB, 7500 * MiB, "cortex-a76", 4, _A76, dotprod=True),
    Board("pi5-16gb", 16 * GiB, 15500 * MiB, "cortex-a76", 4, _A76, dotprod=True),
)}

# Phone classes for `edgellm package android|ios`: RAM, and what one foreground app may use before the
# OS ends it (Android's low-memory killer, iOS's jetsam limit without the increased-memory
# entitlement). Usable is ~40 % of RAM on Android and ~50 % on iPhone: public platform guidance and
# developer reports, not measured here; a phone proves the real figure.
PHONES: dict[str, Board] = {b.name: b for b in (
    Board("android-3gb", 3 * GiB, 1200 * MiB, "cortex-a55", 8, ()),
    Board("android-4gb", 4 * GiB, 1600 * MiB, "cortex-a76", 8, (), dotprod=True),
    Board("android-6gb", 6 * GiB, 2400 * MiB, "cortex-a78", 8, (), dotprod=True),
    Board("android-8gb", 8 * GiB, 3200 * MiB, "cortex-x1", 8, (), dotprod=True),
    Board("iphone-4gb", 4 * GiB, 2000 * MiB, "apple-a15", 6, (), dotprod=True),
    Board("iphone-6gb", 6 * GiB, 3000 * MiB, "apple-a16", 6, (), dotprod=True),
    Board("iphone-8gb", 8 * GiB, 4000 * MiB, "apple-a17", 6, (), dotprod=True),
)}


def phone(name: str) -> Board:
    try:
        return PHONES[name]
    except KeyError:
        raise UsageError(f"unknown phone class {name!r}: choose one of {', '.join(PHONES)}") from None


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak resident bytes of a session, by part (see the module docstring)."""

    model: str
    path: str
    quant: str | None
    n_ctx: int
    kv_type: str
    flash_attn: bool
    n_seq: int
    n_params: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    state_cache_bytes: int
    runtime_bytes: int
    compute_buffer_bytes: int = 0  # what llama.cpp allocates for computing (more than becomes resident)

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.kv_bytes + self.compute_bytes + self.state_cache_bytes
                + self.runtime_bytes)

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights_bytes, "kv_cache": self.kv_bytes, "compute": self.compute_bytes,
                "state_cache": self.state_cache_bytes, "runtime": self.runtime_bytes}

    def llama_cpp_buffers(self) -> dict[str, int]:
        """The buffers llama.cpp allocates and logs (model, KV, compute), as estimated."""
        return {"weights": self.weights_bytes, "kv_cache": self.kv_bytes, "compute": self.compute_buffer_bytes}

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


@dataclass(frozen=True)
class FitReport:
    board: str
    usable_bytes: int
    needed_bytes: int
    fits: bool
    headroom_bytes: int  # usable - needed (negative when it does not fit)
    suggestions: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        need, have = self.needed_bytes / MiB, self.usable_bytes / MiB
        if self.fits:
            return f"fits {self.board}: needs {need:.0f} MiB of {have:.0f} MiB usable"
        tip = "; ".join(self.suggestions) or "use a smaller model"
        return f"does not fit {self.board}: needs {need:.0f} MiB but {have:.0f} MiB is usable — {tip}"

    def to_dict(self) -> dict:
        return {**asdict(self), "suggestions": list(self.suggestions), "message": self.message}


def kv_cache_bytes(info: GGUFInfo, n_ctx: int, kv_type: str = "f16") -> int:
    """Bytes of K and V for n_ctx tokens (what llama.cpp allocates for a standard attention cache)."""
    if kv_type not in KV_BYTES:
        raise UsageError(f"unknown KV-cache type {kv_type!r}; choose from {', '.join(KV_BYTES)}")
    hp = info.hparams()
    head_dim = hp["embedding_length"] // hp["head_count"]
    per_token = 2 * hp["block_count"] * hp["head_count_kv"] * head_dim
    return int(per_token * n_ctx * KV_BYTES[kv_type])


def _dims(info: GGUFInfo) -> dict[str, int]:
    hp = info.hparams()

    def most(v):
        return max(v) if isinstance(v, list) else v

    embd, heads = hp["embedding_length"], most(hp["head_count"])
    heads_kv = most(hp.get("head_count_kv") or heads)
    return {"embd": embd, "heads": heads, "embd_kv": embd // heads * heads_kv,
            "ff": most(hp["feed_forward_length"]), "vocab": hp["vocab_size"] or 0}


def _attention_peak(d: dict[str, int], ub: int, n_kv: int, flash_attn: bool) -> int:
    """The compute buffer's peak inside attention, for a micro-batch of ub tokens over n_kv cells:
    the layer's activations (per token: residual, norm, Q, attention output and its contiguous copy,
    K and V) plus, without flash attention, the f32 scores [n_kv, ub, n_head] (softmax runs in place)
    and the f32 mask [n_kv, ub]; with flash attention only the f16 mask."""
    act = ub * (5 * d["embd"] + 2 * d["embd_kv"]) * 4
    return act + (n_kv * ub * 2 if flash_attn else n_kv * ub * (d["heads"] + 1) * 4)


def _ffn_peak(d: dict[str, int], ub: int) -> int:
    return ub * (2 * d["embd"] + 3 * d["ff"]) * 4  # residual, norm, gate, up, gate·up


def compute_buffer_bytes(info: GGUFInfo, n_ctx: int, flash_attn: bool, n_ubatch: int = N_UBATCH) -> int:
    """The compute buffer llama.cpp allocates ("CPU compute buffer size" in its log).

    llama-context.cpp reserves it for the worst-case graph: a micro-batch of ub = min(n_ubatch, n_ctx)
    tokens over the whole KV cache with every token an output. Its allocator lets tensors whose lives
    do not overlap share memory, so the buffer is the graph's highest point: attention at full depth
    or the output (f32 logits [n_vocab, ub] with the final hidden state and its norm). Checked against
    llama.cpp's log (one sequence) at 256 to 8192 tokens, flash attention on and off, on SmolLM2-135M and
    the random-weight shape of benchmarks/memplan_accuracy.py: within 2 %. With several server slots each
    stream attends over its own n_ctx cells with its share of the tokens, so the totals should be the
    same; not measured.
    """
    d = _dims(info)
    ub = min(n_ubatch, n_ctx)
    n_kv = -(-n_ctx // KV_PAD) * KV_PAD
    output = ub * (d["vocab"] + 2 * d["embd"]) * 4
    return max(_attention_peak(d, ub, n_kv, flash_attn), output, _ffn_peak(d, ub))


def compute_bytes(info: GGUFInfo, n_ctx: int, flash_attn: bool, n_ubatch: int = N_UBATCH, n_seq: int = 1) -> int:
    """What a session makes resident for computing: the compute buffer as a long prompt uses it (the last
    micro-batch attends over the full context; only the last token of a prompt is an output, so the
    logits rows of the worst-case graph are never written), the CPU backend's work buffer (the f16 copy
    of the scores that the V·softmax product reads, without flash attention) and llama.cpp's logits
    rows (one per sequence). Only checked through the total against a process's peak RSS (SmolLM2-135M,
    f16 KV: 0.94 / 0.98 / 0.99 of it at 1024 / 4096 / 8192 tokens)."""
    d = _dims(info)
    ub = min(n_ubatch, n_ctx)
    n_kv = -(-n_ctx // KV_PAD) * KV_PAD
    work = 0 if flash_attn else n_kv * ub * d["heads"] * 2
    return max(_attention_peak(d, ub, n_kv, flash_attn) + work, _ffn_peak(d, ub)) + n_seq * d["vocab"] * 4


def default_flash_attn(kv_type: str, device: str = "cpu") -> bool:
    """What `edgellm.load` runs with: off on CPU for f16/f32/bf16 caches, on for quantized ones."""
    return device != "cpu" or kv_type not in ("f16", "f32", "bf16")


def estimate(model_path: str | os.PathLike[str] | GGUFInfo, n_ctx: int, kv_type: str = "f16", *,
             flash_attn: bool | None = None, n_seq: int = 1, state_cache_bytes: int | None = None,
             server: bool = False) -> MemoryEstimate:
    """Peak RAM of `model_path` at `n_ctx` tokens (clamped to the model's trained context).

    n_seq: sequences (server slots), each with its own n_ctx-cell KV stream. state_cache_bytes: KV
    snapshots kept for reuse; default one full-context snapshot (a session switching conversations
    holds at least that). server: add the HTTP stack's share.
    """
    info = model_path if isinstance(model_path, GGUFInfo) else validate_gguf(Path(model_path))
    if n_ctx < 16:
        raise UsageError(f"context size must be at least 16 tokens, got {n_ctx}")
    trained = info.hparams().get("context_length")
    n_ctx = min(n_ctx, trained) if trained else n_ctx
    fa = default_flash_attn(kv_type) if flash_attn is None else flash_attn
    kv = kv_cache_bytes(info, n_ctx, kv_type)  # per sequence: each has its own n_ctx-cell stream
    return MemoryEstimate(
        model=Path(info.path).name, path=str(info.path), quant=info.file_type_name, n_ctx=n_ctx, kv_type=kv_type,
        flash_attn=fa, n_seq=n_seq, n_params=info.n_params, weights_bytes=info.file_size, kv_bytes=kv * n_seq,
        compute_bytes=compute_bytes(info, n_ctx, fa, n_seq=n_seq),
        compute_buffer_bytes=compute_buffer_bytes(info, n_ctx, fa),
        state_cache_bytes=kv if state_cache_bytes is None else state_cache_bytes,
        runtime_bytes=RUNTIME_OVERHEAD_BYTES + (SERVER_OVERHEAD_BYTES if server else 0))


def live_board() -> Board:
    """This machine as a Board: usable = FIT_FRACTION of the memory available now."""
    from .device import probe

    p = probe()
    avail = p.ram_available_bytes or p.ram_bytes
    return Board("this-device", p.ram_bytes, int(avail * FIT_FRACTION), p.cpu_model or p.arch,
                 p.physical_cores or p.logical_cores, (), dotprod="dotprod" in p.features)


def board(name: str) -> Board:
    if name in ("this", "this-device", "local", "auto"):
        return live_board()
    try:
        return BOARDS[name]
    except KeyError:
        raise UsageError(f"unknown board {name!r}: choose one of {', '.join(BOARDS)} or 'this-device'") from None


def check_fit(est: MemoryEstimate, target: Board | str) -> FitReport:
    b = board(target) if isinstance(target, str) else target
    need = est.total_bytes
    fits = b.usable_bytes <= 0 or need <= b.usable_bytes
    return FitReport(b.name, b.usable_bytes, need, fits, b.usable_bytes - need,
                     () if fits else _suggest(est, b.usable_bytes))


def require_fit(est: MemoryEstimate, target: Board | str) -> FitReport:
    """check_fit, raising InsufficientMemoryError (with the numbers and what would fit) when it does not."""
    report = check_fit(est, target)
    if not report.fits:
        raise InsufficientMemoryError(
            f"{est.model} ({est.quant or '?'}, ctx {est.n_ctx}, KV {est.kv_type}) {report.message}")
    return report


def _suggest(est: MemoryEstimate, usable: int) -> list[str]:
    out = []
    info = validate_gguf(Path(est.path))
    keep = {"flash_attn": est.flash_attn, "n_seq": est.n_seq, "server": est.runtime_bytes > RUNTIME_OVERHEAD_BYTES}
    snap = est.state_cache_bytes / max(est.kv_bytes // est.n_seq, 1)  # snapshots scale with the context too
    for ctx in range(est.n_ctx // 256 * 256, 255, -256):
        e = estimate(info, ctx, est.kv_type, **keep,
                     state_cache_bytes=int(kv_cache_bytes(info, ctx, est.kv_type) * snap))
        if e.total_bytes <= usable:
            out.append(f"--ctx {ctx} fits")
            break
    if est.kv_type in ("f16", "f32", "bf16"):
        kv8 = est.kv_bytes * KV_BYTES["q8_0"] / KV_BYTES[est.kv_type]
        saved = (est.kv_bytes + est.state_cache_bytes) * (1 - kv8 / est.kv_bytes)
        if est.total_bytes - saved <= usable:
            out.append("--kv-type q8_0 fits")
    room = usable - (est.total_bytes - est.weights_bytes)
    bpw_now = est.weights_bytes * 8 / max(1, est.n_params)
    for quant, bpw in SMALLER_QUANTS:
        if bpw < bpw_now - 0.2 and room > 0 and est.weights_bytes * bpw / bpw_now <= room:
            out.append(f"a {quant} quant (~{est.weights_bytes * bpw / bpw_now / MiB:.0f} MiB) fits")
            break
    return out
