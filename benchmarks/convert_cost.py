"""What a conversion costs: time against llama.cpp's own convert + quantize, and peak memory on a ≥1B model.

time: the shipped SmolLM2-135M exported as a BF16 Hugging Face directory (what a hub download looks
  like) goes to Q4_K_M twice per round, interleaved: llama.cpp's way (its convert_hf_to_gguf.py from
  the llama.cpp that llama-cpp-python vendors, --outtype f16, then llama_model_quantize, which is what
  llama-quantize calls) and `edgellm convert` (F32 staging + importance matrix + the same quantizer).
  Target: edgellm / llama.cpp ≤ 1.5 (median of the rounds).
memory: a random-weight Llama checkpoint of ≥ 1B parameters (BF16 safetensors) through `edgellm convert
  --quant Q4_K_M` in a fresh process; its peak RSS (VmHWM) against 2 × the largest tensor (F32) plus the
  quantizer's output buffers. Memory must not grow with the model.

    python benchmarks/convert_cost.py --rounds 3          # writes benchmarks/out/convert_cost.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmeta  # noqa: E402
from llama_bench import _download_sdist, _extract_llama_cpp, installed_version  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
QUANT = "Q4_K_M"


def _log(msg: str) -> None:
    print(f"[convert_cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def vendored_llama_cpp(workdir: Path) -> Path:
    """The llama.cpp source tree llama-cpp-python vendors (its convert script and gguf-py)."""
    version = installed_version()
    root = workdir / f"llama-cpp-python-{version}"
    hits = list(root.glob("src/*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not hits:
        _extract_llama_cpp(_download_sdist(version, root / "sdist"), root / "src")
        hits = list(root.glob("src/*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return hits[0].parent


def _timed(cmd: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return time.perf_counter() - t


def llama_cpp_way(llama_cpp: Path, hf: Path, work: Path, threads: int) -> float:
    """convert_hf_to_gguf.py (f16) + llama_model_quantize, as a user would run them by hand."""
    f16 = work / "llama-cpp-f16.gguf"
    t = _timed([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16",
                "--outfile", str(f16)])
    quant = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
             f"p.ftype = {_ftype(QUANT)}; p.nthread = {threads}; "
             "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
    t += _timed([sys.executable, "-c", quant, str(f16), str(work / "llama-cpp-q.gguf")])
    f16.unlink()
    (work / "llama-cpp-q.gguf").unlink()
    return t


def edgellm_way(hf: Path, work: Path, threads: int, extra: tuple[str, ...] = ()) -> float:
    dest = work / "edgellm-q.gguf"
    t = _timed([sys.executable, "-m", "edgellm.cli", "convert", str(hf), "-o", str(dest), "--quant", QUANT,
                "--threads", str(threads), "--force", *extra])
    dest.unlink()
    return t


def _ftype(name: str) -> int:
    import gguf
    return int(gguf.LlamaFileType[f"MOSTLY_{name}"])


def time_rounds(model: Path, work: Path, rounds: int, threads: int) -> dict:
    from edgellm.converters.gguf_source import read_gguf
    from edgellm.converters.hf_writer import write_hf

    hf = work / "smollm2-hf-bf16"
    if not hf.exists():
        _log(f"exporting {model.name} as a BF16 HF directory")
        write_hf(read_gguf(model), hf, "BF16")
    llama_cpp = vendored_llama_cpp(work)
    ll, ed, plain = [], [], []
    for r in range(rounds):
        ll.append(llama_cpp_way(llama_cpp, hf, work, threads))
        ed.append(edgellm_way(hf, work, threads))
        plain.append(edgellm_way(hf, work, threads, ("--no-imatrix",)))
        _log(f"round {r + 1}/{rounds}: llama.cpp {ll[-1]:.1f} s, edgellm {ed[-1]:.1f} s, "
             f"edgellm --no-imatrix {plain[-1]:.1f} s")
    ratio = statistics.median(ed) / statistics.median(ll)
    return {"source": "SmolLM2-135M HF BF16", "quant": QUANT, "threads": threads, "llama_cpp_s": ll, "edgellm_s": ed,
            "edgellm_no_imatrix_s": plain, "ratio": round(ratio, 3),
            "ratio_no_imatrix": round(statistics.median(plain) / statistics.median(ll), 3),
            "target": 1.5, "pass": ratio <= 1.5}


def random_checkpoint(dest: Path, tokenizer_from: Path) -> tuple[Path, int, int]:
    """A ≥1B-parameter random Llama in BF16 safetensors, written tensor by tensor (SmolLM2's tokenizer)."""
    import numpy as np

    from edgellm.converters.checkpoint import Checkpoint, ModelConfig, TensorSource, hf_tensor_shapes
    from edgellm.converters.gguf_source import read_gguf
    from edgellm.converters.hf_writer import write_hf

    tok = read_gguf(tokenizer_from).tokenizer
    cfg = ModelConfig(architecture="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=len(tok.tokens),
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
    shapes = hf_tensor_shapes(cfg)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    largest = max(int(np.prod(s)) for s in shapes.values())
    if not dest.exists():
        def load(name: str) -> np.ndarray:
            rng = np.random.default_rng(abs(hash(name)) % 2**32)
            shape = shapes[name]
            if len(shape) == 1:
                return np.ones(shape, np.float32)
            return (rng.standard_normal(shape, dtype=np.float32) * (1 / np.sqrt(shape[1]))).astype(np.float32)
        _log(f"writing a random {n_params / 1e9:.2f}B-parameter checkpoint to {dest}")
        write_hf(Checkpoint(cfg, TensorSource(shapes, load), dataclasses.replace(tok, hf_files={}), "random-1b"),
                 dest, "BF16")
    return dest, n_params, largest


def peak_memory(model: Path, work: Path, threads: int, calib_tokens: int) -> dict:
    hf, n_params, largest = random_checkpoint(work / "random-1b-hf", model)
    dest = work / "random-1b-q.gguf"
    probe = ("import resource, subprocess, sys; "
             "p = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "edgellm.cli", "convert", str(hf),
                           "-o", str(dest), "--quant", QUANT, "--threads", str(threads), "--force",
                           "--calib-tokens", str(calib_tokens)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert failed:\n{proc.stderr[-2000:]}")
    peak = int(proc.stdout.strip().splitlines()[-1]) * 1024   # KiB; the probe's child is a fresh exec
    out_bytes = dest.stat().st_size
    dest.unlink()
    largest_f32 = 4 * largest
    # the bound: 2 × the largest tensor (F32) plus output buffers — the quantized copy of that
    # tensor, at most Q8_0's 8.5 bits per weight
    bound = 2 * largest_f32 + int(largest * 8.5 / 8)
    return {"params": n_params, "largest_tensor_f32_mb": round(largest_f32 / 1e6, 1),
            "peak_rss_mb": round(peak / 1e6, 1), "bound_mb": round(bound / 1e6, 1),
            "output_mb": round(out_bytes / 1e6, 1), "seconds": round(time.perf_counter() - t, 1), "pass": peak <= bound}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="source GGUF (default: the shipped SmolLM2-135M)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--calib-tokens", type=int, default=1024, help="calibration tokens for the 1B run")
    ap.add_argument("--skip-memory", action="store_true", help="only the timing comparison")
    ap.add_argument("--skip-time", action="store_true", help="only the memory measurement")
    ap.add_argument("--workdir", type=Path, default=OUT / "convert-work")
    ap.add_argument("--out", type=Path, default=benchmeta.out_path("convert_cost"))
    args = ap.parse_args(argv)
    from edgellm import store

    model = args.model or store.resolve("smollm2-135m").path
    args.workdir.mkdir(parents=True, exist_ok=True)
    benchmeta.start()
    result = {} if args.skip_time else {"time": time_rounds(model, args.workdir, args.rounds, args.threads)}
    if not args.skip_memory:
        result["memory"] = peak_memory(model, args.workdir, args.threads, args.calib_tokens)
    print(benchmeta.save(result, args.out, "convert_cost.py", argv))


if __name__ == "__main__":
    main()
