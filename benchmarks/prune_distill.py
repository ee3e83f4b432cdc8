"""Prune + distill SmolLM2-135M to ≤ 100M parameters and measure what it costs and buys.

One run: prune (budget 100M, widths aligned to 256, with the closed-form refit of converters/refit.py unless
--no-refit) → distill on the CPU (the F32 teacher's top-k logits, computed in torch; default training text =
calibration text ×3 + 131,072 tokens the teacher samples from its whole distribution at T = 1, 128 at a time; 1 in
20 sequences held back to pick the best state) → figures:
- held-out perplexity and mean KLD to the F32 teacher of the pruned-only and the distilled student (and, with
  --compare-plain, of the same budget pruned without the refit: importance cuts, sliced weights),
- decode tok/s of student and teacher at the same quant type (Q4_K_M), interleaved in one process,
- the distilled student at Q4_K_M against the teacher quantized to about the same file size,
- wall time of prune + distill, and the machine's load average (the CPU is shared).
Held-out text is edgellm's heldout.txt, never trained on. Prints JSON (or --markdown rows for the README).

    python benchmarks/prune_distill.py --minutes 35 --threads 2 --out benchmarks/out/prune_distill.json

The whole of prune + data + training is meant to fit in 60 minutes on 2 cores: pruning with the refit
takes ~6, the teacher's text and top-k logits ~11 (cold: run with a fresh EDGELLM_HOME to time them, they are
cached there), training --minutes, and measuring the held-back sequences plus saving state a minute or two beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
SAME_SIZE_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_XS", "Q4_0", "IQ4_NL", "Q4_K_S", "Q4_K_M")


def _log(msg: str) -> None:
    print(f"[prune_distill {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pick_threads(requested: int | None) -> int:
    """1 or 2 torch/llama.cpp threads, whichever multiplies matrices faster right now (the CPU is shared)."""
    import torch

    if requested:
        return requested
    a = torch.randn(768, 768)
    speed = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < 2.0:
            a @ a
            k += 1
        speed[n] = k / (time.perf_counter() - t0)
    best = max(speed, key=speed.get)
    _log(f"matmul rate by threads {speed}: using {best}")
    return best


def evaluate_all(models: dict[str, Path], ref: Path, threads: int) -> dict[str, dict]:
    from edgellm.converters.evaluate import evaluate
    from edgellm.texts import heldout_text

    out = {}
    for name, path in models.items():
        _log(f"evaluating {name}")
        r = evaluate(path, ref, heldout_text(), ctx=512, threads=threads)
        out[name] = {"perplexity": r.perplexity, "teacher_perplexity": r.ref_perplexity, "mean_kld": r.mean_kld,
                     "p99_kld": r.p99_kld, "top1_agreement": r.top1_agreement, "tokens_scored": r.tokens_scored,
                     "bytes": r.size_bytes, "bits_per_weight": r.bits_per_weight}
    return out


def decode_speed(models: dict[str, Path], threads: int, reps: int, n_gen: int) -> dict[str, float]:
    """Median greedy decode tok/s of each model, rounds interleaved so all see the same machine load."""
    from edgellm.bench import SpeedBench

    benches = {k: SpeedBench(str(p), threads, n_gen=n_gen, anchor=False) for k, p in models.items()}
    runs: dict[str, list[float]] = {k: [] for k in models}
    try:
        for r in range(reps):
            order = list(benches) if r % 2 == 0 else list(benches)[::-1]
            for k in order:
                runs[k].append(benches[k].edgellm_tg(n_gen))
    finally:
        for b in benches.values():
            b.close()
    return {k: statistics.median(v) for k, v in runs.items()} | {"runs": runs}


def compare(files: dict[str, Path], f32: Path, threads: int, reps: int) -> dict:
    """Quality against the F32 teacher and interleaved decode speed of the quantized models."""
    from edgellm.bench import paired_ratio

    quality = evaluate_all({k: v for k, v in files.items() if k != "teacher_f32"}, f32, threads)
    _log("decode speed")
    speed = decode_speed({k: v for k, v in files.items() if k.endswith(("q4_k_m", "size"))}, threads, reps, 128)
    paired = paired_ratio(speed["runs"]["student_q4_k_m"], speed["runs"]["teacher_q4_k_m"])
    return {"quality": quality, "decode_tps": speed, "decode_speedup_q4_k_m": paired,
            "decode_speedup_of_medians": speed["student_q4_k_m"] / speed["teacher_q4_k_m"]}


def remeasure(args) -> None:
    """Quality and speed again, from the files a full run left in --work, on whatever machine this is now."""
    from edgellm.converters.pipeline import convert

    res = json.loads(args.remeasure.read_text())
    threads = pick_threads(args.threads)
    os.environ["EDGELLM_THREADS"] = str(threads)
    work, load_start = args.work, os.getloadavg()
    files = {"distilled_f32": work / "student-distilled-f32.gguf", "student_q4_k_m": work / "student_q4_k_m.gguf",
             "teacher_q4_k_m": work / "teacher_q4_k_m.gguf",
             "teacher_same_size": work / f"teacher-{res['same_size_teacher_type'].lower()}.gguf",
             "teacher_target_size": work / "teacher-target-size.gguf"}
    f32 = work / "teacher-f32.gguf"
    target = files["student_q4_k_m"].stat().st_size
    _log(f"teacher --target-size {target} bytes (the student's Q4_K_M file)")
    convert(str(f32), files["teacher_target_size"], quant="AUTO", target_size=target, threads=threads)
    out = compare(files, f32, threads, args.reps)
    teacher_ppl = out["quality"]["distilled_f32"]["teacher_perplexity"]
    res["remeasured"] = {"threads": threads, "load_average_start": load_start, "load_average_end": os.getloadavg(),
                         "teacher_target_size_bytes": files["teacher_target_size"].stat().st_size, **out}
    res["targets"].update({
        "ppl_ratio_distilled": out["quality"]["distilled_f32"]["perplexity"] / teacher_ppl,
        "decode_speedup_q4_k_m": out["decode_speedup_q4_k_m"],
        "decode_speedup_of_medians": out["decode_speedup_of_medians"],
        "decode_ge_1.25x": out["decode_speedup_q4_k_m"] >= 1.25,
        "student_q4_beats_same_size_teacher_kld": out["quality"]["student_q4_k_m"]["mean_kld"]
        < min(out["quality"][k]["mean_kld"] for k in ("teacher_same_size", "teacher_target_size"))})
    text = json.dumps(res, indent=2, default=str)
    (args.out or args.remeasure).write_text(text + "\n")
    print(text)


def main() -> None:
    from edgellm.converters.kd_data import DEFAULT_RECIPE, TextRecipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", default="100M")
    ap.add_argument("--align", type=int, default=256)
    ap.add_argument("--minutes", type=float, default=35.0,
                    help="distillation training budget (0: score the pruned student untrained)")
    ap.add_argument("--gen-tokens", type=int, default=131072)
    ap.add_argument("--prose-repeats", type=int, default=DEFAULT_RECIPE.prose_repeats,
                    help="the calibration text this many times in the data")
    ap.add_argument("--gen-temperature", type=float, default=DEFAULT_RECIPE.temperature)
    ap.add_argument("--gen-filtered", action="store_true",
                    help="sample as edgellm's sampler does (top-k 40, top-p 0.95, min-p 0.05), not the teacher's "
                         "whole distribution")
    ap.add_argument("--threads", type=int, default=None, help="[default: 1 or 2, whichever is faster now]")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", type=Path, default=OUT / "prune")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-refit", action="store_true", help="prune without the closed-form refit (the old way)")
    ap.add_argument("--compare-plain", action="store_true",
                    help="also prune without the refit (not distilled) and score it, for the before-training ratio")
    ap.add_argument("--remeasure", type=Path, default=None, metavar="JSON",
                    help="re-measure quality and decode speed from an earlier run's files in --work (its JSON), "
                         "adding the teacher converted with --target-size at the student's exact file size")
    args = ap.parse_args()
    if args.remeasure:
        return remeasure(args)

    import torch

    from edgellm import store
    from edgellm.converters.distill import DistillConfig, distill_model
    from edgellm.converters.gguf_source import read_gguf
    from edgellm.converters.gguf_writer import write_gguf
    from edgellm.converters.pipeline import convert
    from edgellm.converters.prune import n_params, prune_model

    load_start = os.getloadavg()
    threads = pick_threads(args.threads)
    torch.set_num_threads(threads)
    os.environ["EDGELLM_THREADS"] = str(threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    shipped = store.pull(store.DEFAULT_ALIAS, quiet=True)
    teacher = read_gguf(shipped)
    f32 = work / "teacher-f32.gguf"
    if not f32.exists():
        _log("writing the F32 teacher (the reference)")
        write_gguf(teacher, f32, "F32")

    t0 = time.perf_counter()
    _log(f"pruning to {args.budget}, align {args.align}")
    pruned = prune_model(teacher, args.budget, align=args.align, threads=threads, refit=not args.no_refit)
    t_prune = time.perf_counter() - t0
    _log(f"pruned in {t_prune:.0f}s: {pruned.plan.shape.describe()}")
    cfg = DistillConfig(minutes=args.minutes or 1.0, threads=threads)
    if args.minutes > 0:
        shown: dict[str, int] = {}

        def stage(name: str, done: int, total: int) -> None:   # every tenth of a data stage
            if done * 10 // total > shown.get(name, -1):
                shown[name] = done * 10 // total
                _log(f"{name}: {done}/{total}")

        recipe = TextRecipe(args.prose_repeats, args.gen_temperature, args.gen_filtered)
        student, report = distill_model(pruned.checkpoint, shipped, cfg, gen_tokens=args.gen_tokens, evaluate=False,
                                        recipe=recipe,
                                        work_dir=work / "distill-run", progress=stage,
                                        on_step=lambda s: s["step"] % 25 == 0 and _log(
                                            f"step {s['step']} loss {s['loss']:.4f} {s['tok_s']:.0f} tok/s "
                                            f"ETA {s['eta_s'] / 60:.1f} min"))
    else:  # --minutes 0: the pruned (refitted) student as it is, before any training
        student, report = pruned.checkpoint, {"training": {"skipped": "--minutes 0", "device": None}}
    t_total = time.perf_counter() - t0
    _log(f"prune + distill took {t_total / 60:.1f} min")

    files = {"pruned_f32": work / "student-pruned-f32.gguf", "distilled_f32": work / "student-distilled-f32.gguf"}
    write_gguf(pruned.checkpoint, files["pruned_f32"], "F32")
    write_gguf(student, files["distilled_f32"], "F32")
    quant = {"teacher_q4_k_m": (f32, "Q4_K_M"), "student_q4_k_m": (files["distilled_f32"], "Q4_K_M")}
    for name, (src, q) in quant.items():
        _log(f"quantizing {name}")
        files[name] = work / f"{name}.gguf"
        convert(str(src), files[name], quant=q, threads=threads)
    target = files["student_q4_k_m"].stat().st_size
    sizes = {}
    for q in SAME_SIZE_TYPES:   # the teacher at the preset whose file size is closest to the student's
        dest = work / f"teacher-{q.lower()}.gguf"
        if not dest.exists():
            convert(str(f32), dest, quant=q, threads=threads)
        sizes[q] = dest.stat().st_size
    same = min(sizes, key=lambda q: abs(sizes[q] - target))
    files["teacher_same_size"] = work / f"teacher-{same.lower()}.gguf"

    plain_shape = None
    if args.compare_plain:
        _log("pruning without the refit, for comparison")
        plain = prune_model(teacher, args.budget, align=args.align, threads=threads, refit=False)
        plain_shape = plain.plan.shape.describe()
        files["pruned_plain_f32"] = work / "student-pruned-plain-f32.gguf"
        write_gguf(plain.checkpoint, files["pruned_plain_f32"], "F32")
    out = compare({k: files[k] for k in ("pruned_f32", "distilled_f32", "student_q4_k_m", "teacher_q4_k_m",
                                         "teacher_same_size", "pruned_plain_f32") if k in files},
                  f32, threads, args.reps)
    quality, speed, paired = out["quality"], out["decode_tps"], out["decode_speedup_q4_k_m"]
    teacher_ppl = quality["distilled_f32"]["teacher_perplexity"]
    res = {
        "settings": {"budget": args.budget, "align": args.align, "minutes": args.minutes,
                     "gen_tokens": args.gen_tokens, "prose_repeats": args.prose_repeats,
                     "gen_temperature": args.gen_temperature, "gen_filtered": args.gen_filtered,
                     "threads": threads, "loss": cfg.loss, "lr": cfg.lr,
                     "refit": not args.no_refit, "device": report["training"].get("device")},
        "plain_prune_shape": plain_shape,
        "refit_mean_error": pruned.explain(teacher.config).get("refit_mean_error"),
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "teacher_params": n_params(teacher.config), "student_params": n_params(pruned.checkpoint.config),
        "student_shape": pruned.plan.shape.describe(), "removed_layers": pruned.plan.summary(teacher.config)[
            "removed_layers"],
        "candidates": pruned.explain(teacher.config)["candidates"],
        "prune_seconds": t_prune, "prune_distill_seconds": t_total, "distill": report,
        "teacher_perplexity_f32": teacher_ppl, "quality": quality,
        "same_size_teacher_type": same, "teacher_sizes": sizes,
        "decode_tps": speed,
        "targets": {
            "student_le_100M": n_params(pruned.checkpoint.config) <= 100_000_000,
            "ppl_ratio_pruned": quality["pruned_f32"]["perplexity"] / teacher_ppl,
            "ppl_pruned_le_2.5x": quality["pruned_f32"]["perplexity"] <= 2.5 * teacher_ppl,
            "ppl_ratio_pruned_plain": quality["pruned_plain_f32"]["perplexity"] / teacher_ppl
            if "pruned_plain_f32" in quality else None,
            "ppl_ratio_distilled": quality["distilled_f32"]["perplexity"] / teacher_ppl,
            "ppl_distilled_le_1.6x": quality["distilled_f32"]["perplexity"] <= 1.6 * teacher_ppl
            if args.minutes > 0 else None,
            "decode_speedup_q4_k_m": paired,   # median of per-round ratios (edgellm.bench.paired_ratio)
            "decode_speedup_of_medians": out["decode_speedup_of_medians"],
            "decode_ge_1.25x": paired >= 1.25,
            "run_le_60_min": t_total <= 3600,
            "student_q4_beats_same_size_teacher_kld":
                quality["student_q4_k_m"]["mean_kld"] < quality["teacher_same_size"]["mean_kld"],
        },
    }
    text = json.dumps(res, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
