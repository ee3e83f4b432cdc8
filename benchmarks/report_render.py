"""The pieces benchmarks/report.py renders benchmarks/README.md with: formatting helpers, the targets a script
reported (wherever in its JSON it put them), and one renderer per benchmark JSON. Split from report.py, which
keeps the section list, the page and the CLI."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------ small formatting helpers


def get(d: Any, path: str, default: Any = None) -> Any:
    """d['a']['b'][0]... for 'a.b.0'; `default` where any step is missing."""
    for part in path.split("."):
        if isinstance(d, dict) and part in d:
            d = d[part]
        elif isinstance(d, list) and part.lstrip("-").isdigit() and -len(d) <= int(part) < len(d):
            d = d[int(part)]
        else:
            return default
    return d


def num(x: Any, fmt: str = ".3g", suffix: str = "") -> str:
    if isinstance(x, bool) or x is None:
        return "–" if x is None else ("yes" if x else "no")
    if isinstance(x, (int, float)):
        return f"{x:{fmt}}{suffix}"
    return str(x)


def table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A Markdown table; `align` is one character per column ('l' or 'r', default: first l, rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(num(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: Any) -> str:
    return "–" if ok is None else ("**PASS**" if ok else "**FAIL**")


# ------------------------------------------------------------------ targets, wherever a script put them


@dataclass
class Target:
    what: str
    bound: str
    value: str
    ok: bool | None


def _bound(b: Any) -> str:
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        return f"≤ {b:g}"
    return "" if b is None else str(b)


BOOLEAN_TARGETS = {"target_met": "every row within its target",
                   "target_met_by_default": "the default mode meets its target", "meets_target": "meets its target"}


def targets(data: Any, where: str = "", named: bool = False) -> Iterator[Target]:
    """Every target-like record in a result: dicts with a boolean 'pass'/'met' (and usually 'what',
    'bound', 'value'), 'targets' dicts of booleans (prune_distill's style), and the top-level booleans
    some scripts use (BOOLEAN_TARGETS). `named`: the keys of this dict name what is below them
    (quant_quality's references)."""
    if isinstance(data, dict):
        ok = data.get("pass", data.get("met"))
        if isinstance(ok, bool) and ("bound" in data or "value" in data or "what" in data):
            value = data.get("value")
            if isinstance(value, float):
                value = f"{value:.3g}" + (f" ({data['edgellm_type']})" if data.get("edgellm_type") else "")
            yield Target(f"{where}{data.get('what') or data.get('target') or '?'}", _bound(data.get("bound")),
                         num(value), ok)
            return
        for key, val in data.items():
            if key == "meta":
                continue
            if key in BOOLEAN_TARGETS and isinstance(val, bool):
                yield Target(f"{where}{BOOLEAN_TARGETS[key]}", "", "", val)
            elif key == "targets" and isinstance(val, dict) and any(isinstance(v, bool) for v in val.values()):
                figures = {k: v for k, v in val.items() if not isinstance(v, (bool, dict))}
                for k, v in val.items():
                    if isinstance(v, bool):
                        yield Target(f"{where}{k}", "", "", v)
                if figures:
                    yield Target(f"{where}figures: " + ", ".join(f"{k} {num(v)}" for k, v in figures.items()),
                                 "", "", None)
                yield from targets({k: v for k, v in val.items() if isinstance(v, dict)}, where)
            else:
                yield from targets(val, f"{where}{key}: " if named else where, named=key == "references")
    elif isinstance(data, list):
        for item in data:
            yield from targets(item, where)


def targets_table(data: Any) -> str:
    rows = [[t.what, t.bound, t.value, verdict(t.ok)] for t in targets(data)]
    if not rows:
        return ""
    return table(["target", "bound", "measured", ""], rows, "lrrl")


# ------------------------------------------------------------------ one renderer per benchmark


def render_runtime(d: dict) -> str:
    e, lb, py, t = d.get("edgellm", {}), d.get("llama_bench", {}), d.get("llama_cpp_python", {}), d.get("ttft", {})
    s = d.get("settings", {})
    pct = d.get("pct_of_ceiling", {})
    out = [f"SmolLM2-135M Q4_1, {d.get('threads')} threads, flash attention "
           f"{'on' if d.get('flash_attn') else 'off'} for all three, median of {d.get('rounds')} interleaved rounds.",
           "",
           table(["measure", "edgellm", "llama-bench (C++)", "llama-cpp-python generate()"], [
               [f"prompt pp{s.get('n_prompt')} (tok/s)", num(e.get("pp_tps"), ".1f"), num(lb.get("pp_tps"), ".1f"),
                num(py.get("pp_tps"), ".1f")],
               [f"decode tg{s.get('n_gen')} (tok/s)", num(e.get("tg_tps"), ".1f"), num(lb.get("tg_tps"), ".1f"),
                num(py.get("tg_tps"), ".1f")],
               ["decode in a chat session (tok/s)", num(e.get("session_decode_tps"), ".1f"), "", ""],
               [f"share of the bandwidth ceiling ({num(d.get('ceiling_tps'), '.0f')} tok/s at "
                f"{num(get(d, 'bandwidth.bandwidth_gbs'), '.1f')} GB/s)", num(pct.get("edgellm"), ".0f", "%"),
                num(pct.get("llama_bench"), ".0f", "%"), ""]]),
           ""]
    if t:
        out += [table([f"time to first token ({num(t.get('cold_prompt_tokens'), '.0f')}-token chat; "
                       f"{t.get('system_prompt_tokens')}-token system prompt)", "ms"], [
            ["cold", num((t.get("cold_s") or 0) * 1000, ".0f")],
            ["warm, in process", num((t.get("warm_s") or 0) * 1000, ".0f")],
            ["after a restart, from the disk cache", num((t.get("restart_s") or 0) * 1000, ".0f")],
            ["first question, no system-prompt state", num((t.get("without_state_s") or 0) * 1000, ".0f")],
            ["first question, shipped system-prompt state", num((t.get("shipped_state_s") or 0) * 1000, ".0f")]]),
            "", f"Peak RSS {num(d.get('peak_rss_mb'), '.0f')} MB (benchmark process), "
                f"{num(t.get('restart_peak_rss_mb'), '.0f')} MB (a restarted chat process)."]
    return "\n".join(out)


QUANT_VARIANTS = {
    "llama.cpp": "llama-quantize preset, no importance matrix",
    "llama.cpp+imatrix": "llama.cpp's own imatrix route: llama-imatrix on the same calibration text, then "
                         "llama-quantize --imatrix",
    "edgellm": "the same type with edgellm's importance matrix",
    "edgellm mixed": "edgellm --target-size at that preset's file size (per-tensor types)",
    "edgellm+gptq": "the same type with GPTQ rounding patched in where it lowers the output error",
    "edgellm mixed+gptq": "--target-size with the GPTQ variants as options",
}


def _quant_rows(rows: list[dict]) -> str:
    by = {(r["quant"], r["variant"]): r["mean_kld"] for r in rows if "quant" in r and "variant" in r}

    def ratio(r: dict, anchor: str) -> str:
        base = by.get((r["quant"], anchor))
        if not r["variant"].startswith("edgellm") or not base or r["quant"].startswith("mixed"):
            return ""
        return f"{r['mean_kld'] / base:.2f}×"

    body = [[r["quant"], r["variant"], num(r["bytes"] / 1e6, ".1f"), num(r.get("bpw"), ".2f"), num(r.get("ppl"), ".3f"),
             num(r["mean_kld"], ".5f"), num(r.get("p99_kld"), ".4f"), num(100 * r.get("top1", 0), ".2f", "%"),
             ratio(r, "llama.cpp"), ratio(r, "llama.cpp+imatrix")]
            for r in sorted(rows, key=lambda r: (r["bytes"], r["quant"], r["variant"]))]
    return table(["type", "variant", "size (MB)", "bits/weight", "PPL", "mean KLD", "p99 KLD", "top-1",
                  "KLD vs llama.cpp", "vs llama.cpp+imatrix"], body, "llrrrrrrrr")


def render_quant(d: dict) -> str:
    s = d.get("settings", {})
    out = [f"SmolLM2-135M; {s.get('scored_tokens')} held-out tokens scored ({s.get('max_chunks')} chunks of "
           f"{s.get('ctx')}); importance matrices (edgellm's and llama-imatrix's) from {s.get('calib_tokens')} tokens "
           f"of the shipped calibration text, sensitivity from {s.get('sensitivity_tokens')}. Variants: "
           + "; ".join(f"**{k}** = {v}" for k, v in QUANT_VARIANTS.items()) + "."]
    for name, ref in d.get("references", {}).items():
        what = ("F32 dequantized from the shipped file (on its grid, which flatters that type)" if name == "on-grid"
                else "the same model with its residual stream randomly rotated (same function, off every grid; "
                     "untied output, hence larger files)")
        out += ["", f"**Reference {name}**: {what}.", "", _quant_rows(ref.get("rows", []))]
        if ref.get("plot"):
            out += ["", f"Chart: `{Path(ref['plot']).name}` (written beside the JSON when the script ran)."]
    return "\n".join(out)


def render_onnx(d: dict) -> str:
    out = [f"{d.get('threads')} threads, onnxruntime {d.get('onnxruntime')}; KLD to the F32 model (llama.cpp F32 "
           f"GGUF of the same weights) on held-out text, {d.get('kld_chunks')} chunks of 512 (second half scored)."]
    q = d.get("quality") or {}
    if q:
        base = q.get("builder", {}).get("mean_kld")
        rows = [[k, num(v.get("bytes", 0) / 1e6, ".1f"), num(v.get("mean_kld"), ".4f"),
                 num(100 * (v.get("top1") or 0), ".1f", "%"),
                 f"{v['mean_kld'] / base:.2f}×" if base and v.get("mean_kld") is not None else ""]
                for k, v in q.items()]
        out += ["", table(["model", "size (MB)", "mean KLD", "top-1 vs F32", "KLD vs builder defaults"], rows)]
    b = d.get("builder_variants") or {}
    if b:
        out += ["", "onnxruntime-genai builder variants (`python -m onnxruntime_genai.models.builder -p int4 -e cpu "
                    "--extra_options ...`):", "",
                table(["variant", "extra options"], [[k, " ".join(v) or "(defaults)"] for k, v in b.items()], "ll")]
    for k, err in (d.get("builder_failed") or {}).items():
        out += ["", f"The builder could not make `{k}`: `{err}`."]
    spd = d.get("speed") or {}
    if spd:
        out += ["", f"Decode, greedy, {d.get('n_gen')} tokens after a 1-token prompt, each runner in its own process, "
                    f"{d.get('rounds')} interleaved rounds (CPU busy before the rounds: "
                    f"{', '.join(f'{x:.0%}' for x in spd.get('busy_before_round', []))}):", "",
                table(["runner", "tok/s (median)"], [[k, num(v, ".1f")] for k, v in spd.get("tps", {}).items()]),
                "", table(["paired ratio (median of per-round ratios)", ""],
                          [[k, num(v, ".3f")] for k, v in spd.get("ratios", {}).items()])]
    return "\n".join(out)


def render_serve(d: dict) -> str:
    rows = []
    for r in d.get("runs", []):
        rows.append([f"edgellm serve --{r['mode']}", num(r.get("single_decode_tps"), ".1f"),
                     num(r.get("concurrent_decode_tps"), ".1f"), num(r.get("decode_ratio"), ".2f"),
                     f"{num(r.get('ttft_p50_s'), '.3f')} / {num(r.get('ttft_p95_s'), '.3f')} s",
                     num(r.get("all_completed"))])
    ls = d.get("llama_server")
    if ls:
        rows.append(["llama-server (same model, threads, slots)", num(ls.get("single_decode_tps"), ".1f"),
                     num(ls.get("concurrent_decode_tps"), ".1f"), num(ls.get("decode_ratio"), ".2f"),
                     f"{num(ls.get('ttft_p50_s'), '.3f')} / {num(ls.get('ttft_p95_s'), '.3f')} s",
                     num(ls.get("all_completed"))])
    clients = get(d, "runs.0.clients") or get(d, "llama_server.clients")
    out = [f"{clients} streaming clients at once against one client, {get(d, 'runs.0.max_tokens')} tokens each, "
           f"{get(d, 'runs.0.threads')} threads, loopback; rounds alternate the two phases.", "",
           table(["server", "1 client decode tok/s", f"{clients} clients aggregate tok/s", "ratio",
                  "TTFT p50 / p95", "all complete"], rows, "lrrrrl")]
    vs = d.get("vs_llama_server")
    if vs:
        out += ["", table(["edgellm serve (default) vs llama-server, same run", "ratio"],
                          [[k, num(v, ".3f")] for k, v in vs.items()])]
    return "\n".join(out)


def render_memplan(d: dict) -> str:
    out = []
    for model in d.get("models", [d]):
        rows = []
        for r in model.get("rows", []):
            own = r.get("llama_cpp_parts_mib", {})
            parts = r.get("parts_mib", {})
            rows.append([r["n_ctx"], num(r["estimate_mib"], ".1f"), num(r["measured_peak_mib"], ".1f"),
                         num(r["ratio"], ".3f"),
                         f"{num(parts.get('kv_cache'), '.1f')} / {num(own.get('kv_cache'), '.1f')}",
                         f"{num(parts.get('compute'), '.1f')} / {num(own.get('compute'), '.1f')}",
                         f"{num(parts.get('weights'), '.1f')} / {num(own.get('weights'), '.1f')}"])
        out += [f"**{model.get('model')}** ({model.get('shape', 'the embedded model')})", "",
                table(["ctx", "estimate (MiB)", "measured peak RSS (MiB)", "ratio",
                       "KV: estimate / llama.cpp", "compute: estimate / llama.cpp", "weights: estimate / resident"],
                      rows), ""]
    return "\n".join(out).strip()


def render_convert(d: dict) -> str:
    out = []
    t = d.get("time")
    if t:
        out += [table(["SmolLM2-135M BF16 HF → Q4_K_M", "seconds per round"], [
            ["llama.cpp: convert_hf_to_gguf.py --outtype f16 + llama_model_quantize",
             ", ".join(f"{x:.1f}" for x in t.get("llama_cpp_s", []))],
            ["edgellm convert (F32 staging + imatrix + the same quantizer)",
             ", ".join(f"{x:.1f}" for x in t.get("edgellm_s", []))],
            ["edgellm convert --no-imatrix", ", ".join(f"{x:.1f}" for x in t.get("edgellm_no_imatrix_s", []))]], "ll"),
            "", f"edgellm / llama.cpp: {num(t.get('ratio'), '.2f')}× (target ≤ {t.get('target')}: "
                f"{verdict(t.get('pass'))}); without the imatrix {num(t.get('ratio_no_imatrix'), '.2f')}×."]
    m = d.get("memory")
    if m:
        out += ["", f"Peak RSS converting a random-weight {num(m.get('params', 0) / 1e9, '.2f')}B-parameter Llama "
                    f"(BF16) to Q4_K_M: {num(m.get('peak_rss_mb'), '.0f')} MB against the bound of 2 × the largest "
                    f"tensor in F32 plus its output ({num(m.get('bound_mb'), '.0f')} MB): {verdict(m.get('pass'))}."]
    return "\n".join(out)


def render_prune(d: dict) -> str:
    q = d.get("quality", {})
    speed = d.get("decode_tps", {})
    rows = [[k, num(v.get("bytes", 0) / 1e6, ".1f") if v.get("bytes") else "", num(v.get("perplexity"), ".2f"),
             num(v.get("mean_kld"), ".3f"), num(100 * (v.get("top1_agreement", v.get("top1")) or 0), ".1f", "%"),
             num(speed.get(k), ".1f")] for k, v in q.items() if isinstance(v, dict)]
    out = [f"Student {d.get('student_shape')} ({num(d.get('student_params', 0) / 1e6, '.1f')}M parameters) from the "
           f"{num(d.get('teacher_params', 0) / 1e6, '.1f')}M teacher; teacher F32 held-out PPL "
           f"{num(d.get('teacher_perplexity_f32'), '.2f')}; "
           + (f"pruning (with the refit) took {num((d.get('prune_seconds') or 0) / 60, '.1f')} min; no distillation "
              "(--minutes 0): the distilled rows are the pruned student untrained."
              if get(d, "settings.minutes") == 0 else
              f"prune + distill took {num((d.get('prune_distill_seconds') or 0) / 60, '.1f')} min.")]
    tr, dist = get(d, "distill.training") or {}, d.get("distill") or {}
    if tr.get("val_curve"):
        curve = tr["val_curve"]
        out += ["", f"Training data: {dist.get('training_text')} ({dist.get('training_tokens')} tokens; teacher data "
                f"{num((dist.get('data_seconds') or 0) / 60, '.1f')} min); {tr.get('steps')} steps, "
                f"{tr.get('tokens')} tokens in {num((tr.get('seconds') or 0) / 60, '.1f')} min. Held-back KD loss "
                f"{num(curve[0][1], '.3f')} → {num(min(v for _, v in curve), '.3f')}, lowest at step "
                f"{tr.get('best_step')} (the weights kept)."]
    if rows:
        out += ["", table(["model", "file (MB)", "held-out PPL", "mean KLD", "top-1", "decode tok/s"], rows)]
    return "\n".join(out)


def render_coreml(d: dict) -> str:
    q = d.get("quality", {})
    rows = [[k, num(v.get("size_bytes", 0) / 1e6, ".1f"), num(v.get("mean_kld"), ".4f"),
             num(100 * (v.get("top1") or 0), ".1f", "%")] for k, v in q.items() if isinstance(v, dict)]
    out = ["Core ML cannot predict off macOS: packages are checked by edgellm's MIL interpreter; no speed here."]
    if rows:
        out += ["", table(["package", "size (MB)", "mean KLD to F32", "top-1"], rows)]
    return "\n".join(out)


def render_web(d: dict) -> str:
    return table(["measure", "value"], [
        ["first answer text in the page, median (ms)", num(d.get("page_first_token_ms_median"), ".1f")],
        ["first content delta over HTTP, median (ms)", num(d.get("api_first_token_ms_median"), ".1f")],
        ["page / API", num(d.get("ratio_page_over_api"), ".3f")],
        ["page weight (bytes)", num(d.get("page_weight_bytes"), ",d") if isinstance(d.get("page_weight_bytes"), int)
         else num(d.get("page_weight_bytes"))],
        ["target page / API ≤", num(d.get("target"))], ["meets target", verdict(d.get("meets_target"))]], "lr")


def render_concurrency(d: dict) -> str:
    rows = [[name, c.get("threads"), c.get("requests"), num(c.get("concurrency_1_s"), ".2f"),
             num(c.get("concurrency_8_s"), ".2f"), num(c.get("speedup_8_vs_1"), ".2f")]
            for name, c in d.get("cases", {}).items()]
    return table(["case", "threads", "requests", "one at a time (s)", "8 at once (s)", "speed-up"], rows, "lrrrrr")


def render_speculative(d: dict) -> str:
    """Plain vs prompt lookup per backend and task, with each task's target (speed-up ≥) and greedy identity."""
    rows = [[backend, task, num(t.get("off_tps"), ".1f"), num(t.get("on_tps"), ".1f"), num(t.get("speedup"), ".3f"),
             f"≥ {num(t.get('target'))}", verdict(t.get("met")), "yes" if t.get("greedy_identical") else "**no**",
             num(t.get("accepted_per_drafted"), ".2f")]
            for backend, b in d.get("backends", {}).items() for task, t in b.get("tasks", {}).items()]
    head = (f"{d.get('max_tokens')} tokens per answer, {d.get('rounds')} rounds, {d.get('threads')} threads; "
            "prompt lookup forced on (by default it is on only where batch rows equal single steps: docs/runtime.md).")
    return "\n".join([head, "", table(["backend", "task", "plain tok/s", "lookup tok/s", "speed-up", "target", "",
                                       "greedy identical", "accepted / drafted"], rows, "llrrrrlll")])


def render_optimize(d: dict) -> str:
    """Every candidate optimize weighed — quality, whole-turn speed (what it ranks by), decode and prefill against
    llama-bench — then what each decision chose and how far its pick was from the best over all rounds."""
    decisions = d.get("decisions", {})
    seen = {c["name"]: c for dec in decisions.values() for c in dec.get("candidates", [])}
    whole = {n: v for dec in decisions.values() for n, v in dec.get("whole_turns_tps_median", {}).items()}
    rows = []
    for name, c in seen.items():
        r, ceil = d.get("ratios", {}).get(name, {}), d.get("ceiling", {}).get(name, {})
        rows.append([name, num(c.get("size_mb"), ".1f"), num(c.get("mean_kld"), ".4f"),
                     c.get("excluded") and "excluded" or num(whole.get(name), ".1f"),
                     num(r.get("decode_vs_llama_bench"), ".3f"), num(r.get("deep_decode_vs_llama_bench"), ".3f"),
                     num(r.get("prefill_vs_pp512"), ".2f"), num(ceil.get("pct_of_ceiling"), ".1f")])
    anchor = ("llama-bench at its best flash-attention setting per round" if any("llama_bench_best" in x for x in
              d.get("rounds", [])) else "llama-bench, flash attention off")
    lines = [f"Candidates (medians over the rounds; ratios against {anchor}; KV depth {d.get('kv_depth')} for decode, "
             "768 for deep decode):", "",
             table(["candidate", "MB", "KLD to source", "whole turns tok/s", "decode ×", "deep decode ×",
                    "prefill × pp512", "% bandwidth"], rows, "lrrrrrrr"), ""]
    for quality, dec in decisions.items():
        vs = dec.get("chosen_vs_best_whole_turns")
        lines.append(f"- `--quality {quality}`: chose **{dec.get('winner')}** in {num(dec.get('seconds'), '.0f')} s"
                     + (f"; over all rounds it answers whole turns at {num(vs, '.3f')}× the best candidate" if vs
                        else ""))
    return "\n".join(lines)


def render_generic(d: dict) -> str:
    """Top-level scalar figures (and one level down) of a JSON no renderer knows yet."""
    rows = []
    for k, v in d.items():
        if k == "meta":
            continue
        if isinstance(v, (int, float, str, bool)) and len(str(v)) < 80:
            rows.append([k, num(v, ".4g") if not isinstance(v, str) else v])
        elif isinstance(v, dict):
            rows += [[f"{k}.{k2}", num(v2, ".4g") if not isinstance(v2, str) else v2] for k2, v2 in v.items()
                     if isinstance(v2, (int, float, str, bool)) and len(str(v2)) < 80]
    return table(["figure", "value"], rows[:40], "lr") if rows else ""
