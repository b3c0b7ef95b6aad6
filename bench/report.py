"""The text table of a benchmark run (stdlib only: the orchestrator prints it)."""
from __future__ import annotations

from typing import List, Optional

from bench.comfy_rows import by_pair


def _f(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(out)


def training_table(rows: List[dict], sections=("train", "train-extra"), ref_who="reference") -> str:
    sel = [r for r in rows if r["section"] in sections]
    main = [r for r in rows if r["section"] == sections[0] and r["who"] == ref_who]
    # A row of a back-to-back pair is compared with its own pair's reference; any other row (the
    # extras, run after the pairs) with the last reference run before it.
    refs = {r["model"]: r for r in main}
    pair_refs = {(r["model"], r.get("pair", 1)): r for r in main}
    paired = {r["model"] for r in main if r.get("pair", 1) > 1}
    body = []
    for r in sel:
        ref = pair_refs.get((r["model"], r.get("pair", 1))) if r["section"] == sections[0] else refs.get(r["model"])
        is_ref = r is ref
        who = f"{r['who']} (pair {r.get('pair', 1)})" if r["section"] == sections[0] and r["model"] in paired else r["who"]
        speed = ref["s_per_step"] / r["s_per_step"] if (ref and not is_ref and r["s_per_step"] and ref["s_per_step"]) else None
        mem = r["peak_rss_mib"] / ref["peak_rss_mib"] if (ref and not is_ref and ref["peak_rss_mib"]) else None
        tmem = (r["training_peak_rss_mib"] / ref["training_peak_rss_mib"]
                if (ref and not is_ref and r["training_peak_rss_mib"] and ref["training_peak_rss_mib"]) else None)
        body.append([r["model"], who, f"{r['resolution']}", _f(r["s_per_step"], "{:.3f}"),
                     "" if is_ref else _f(speed, "x{:.2f}"), _f(r["wall_s"], "{:.0f}"), _f(r["setup_s"], "{:.1f}"),
                     _f(r["peak_rss_mib"], "{:.0f}"), "" if is_ref else _f(mem), _f(r["training_peak_rss_mib"], "{:.0f}"),
                     "" if is_ref else _f(tmem), _f(r.get("cuda_peak_mib"), "{:.0f}"),
                     f"{r['warmup']}+{max(0, r['steps'] - r['warmup'])}",
                     _f(r["detail"].get("flops_per_step", 0) / 1e9 or None, "{:.1f}"),
                     _f(100 * r["detail"]["share_of_peak"] if r["detail"].get("share_of_peak") else None, "{:.1f}%")])
    return _table(["model", "trainer", "px", "s/step", "speedup", "wall s", "setup s", "peak RSS MiB", "ours/ref",
                   "train-steps RSS MiB", "ours/ref", "CUDA MiB", "steps", "GFLOP/step", "share of peak"], body)


def classgen_table(rows: List[dict]) -> str:
    sel = [r for r in rows if r["section"] == "classgen"]
    refs = {r["model"]: r for r in sel if r["who"].startswith("reference")}
    body = []
    for r in sel:
        ref = refs.get(r["model"])
        d = r["detail"]
        span = d.get("sampling_span_s")
        rspan = ref["detail"].get("sampling_span_s") if ref else None
        body.append([r["model"], r["who"], f"{r['resolution']}", r["note"], _f(r["wall_s"], "{:.1f}"),
                     _f(span, "{:.1f}"), _f(span / r["images"] if span else None, "{:.2f}"),
                     "" if r is ref else _f(rspan / span if (rspan and span) else None, "x{:.2f}"),
                     _f(r["peak_rss_mib"], "{:.0f}")])
    return _table(["model", "generator", "px", "what", "wall s", "sampling s", "s/image", "speedup", "peak RSS MiB"],
                  body)


def scaling_table(rows: List[dict]) -> str:
    sel = sorted((r for r in rows if r["section"] == "scaling"), key=lambda r: (r["images"], r["resolution"]))
    body = [[r["model"], f"{r['images']}", f"{r['resolution']}", _f(r["s_per_step"], "{:.3f}"), _f(r["setup_s"], "{:.1f}"),
             _f(r["peak_rss_mib"], "{:.0f}"), _f(r["training_peak_rss_mib"], "{:.0f}"),
             _f(r["detail"].get("flops_per_step", 0) / 1e9 or None, "{:.1f}"),
             _f(100 * r["detail"]["share_of_peak"] if r["detail"].get("share_of_peak") else None, "{:.1f}%"),
             r.get("note", "")]
            for r in sel]
    return _table(["model (ours)", "images", "px", "s/step", "setup s", "peak RSS MiB", "train-steps RSS MiB",
                   "GFLOP/step", "share of peak", ""], body)


def format_table(results: dict) -> str:
    rows = results["rows"]
    plan = results["plan"]
    parts = []
    m = results.get("machine", {})
    parts.append(f"machine: {m.get('cpu')} ({m.get('cpus')} cores, {m.get('mem_gib')} GiB), device {plan['device']}, "
                 f"{plan['threads']} torch thread(s) per trainer; {results.get('versions')}")
    if any(r["section"] in ("train", "train-extra") for r in rows):
        parts.append(f"\n== training: LoRA rank {plan['rank']}, prior preservation (1 instance + 1 class image per "
                     f"step), AdamW lr {plan['lr']:g}, fp32 ({plan['mixed_precision']} mixed precision); s/step = "
                     "steady state after the warm-up steps ==")
        parts.append(training_table(rows))
    if any(r["section"] == "classgen" for r in rows):
        parts.append("\n== class-image generation (same count, steps, guidance, resolution, DPM-Solver++ 2M) ==")
        parts.append(classgen_table(rows))
    if any(r["section"] == "scaling" for r in rows):
        parts.append("\n== scaling of our trainer: step time vs resolution and vs number of instance images ==")
        parts.append(scaling_table(rows))
    if results.get("comfy"):
        parts.append("\n== inside ComfyUI: the host's TrainLoraNode and ours on the same MODEL, LoRA rank "
                     f"{plan['rank']}, batch 1, no prior, AdamW; matched = same modules, dtype, checkpointing ==")
        parts.append(comfy_table(results["comfy"]))
        phases = phase_table(results["comfy"])
        if phases:
            parts.append("\n== where a matched step's time goes (s per step; bench.phases) ==")
            parts.append(phases)
    return "\n".join(parts)


def comfy_table(rows: List[dict]) -> str:
    by = by_pair(rows)
    several = any(r.get("pair", 1) > 1 for r in rows)
    body = []
    for r in rows:
        other = by[(r["host"], r["model"], r["case"], r.get("pair", 1))].get("host")
        ref = other if (r["who"] == "ours" and other) else None
        speed = ref["s_per_step"] / r["s_per_step"] if ref and ref["s_per_step"] and r["s_per_step"] else None
        mem = r["peak_rss_mib"] / ref["peak_rss_mib"] if ref else None
        after, ref_after = r.get("after_load_peak_rss_mib"), ref.get("after_load_peak_rss_mib") if ref else None
        after_cell = _f(after, "{:.0f}") + (f" ({after / ref_after:.2f})" if after and ref_after else "")
        who = "TrainLoraNode" if r["who"] == "host" else "ours (Train node)"
        share = r.get("share_of_peak")
        case = r["case"] + ("" if r["matched"] else " (not matched)") + (f" (pair {r.get('pair', 1)})" if several else "")
        body.append([r["host"], r["model"], case, who,
                     f"{r['trainable_params']:,}", _f(r["s_per_step"], "{:.3f}"), _f(speed, "x{:.2f}"),
                     _f(r["peak_rss_mib"], "{:.0f}"), _f(mem), after_cell, _f(r["training_peak_rss_mib"], "{:.0f}"),
                     _f(r["flops_per_step"] / 1e9 if r.get("flops_per_step") else None, "{:.2f}"),
                     _f(r.get("peak_gflops"), "{:.0f}"), _f(100 * share if share else None, "{:.1f}%"), r.get("note", "")])
    return _table(["ComfyUI", "model", "case", "trainer", "trainable", "s/step", "speedup", "peak RSS MiB",
                   "ours/host", "after load MiB (ours/host)", "train-steps RSS MiB", "GFLOP/step", "peak GFLOP/s",
                   "share of peak", ""], body)


def phase_table(rows: List[dict]) -> str:
    sel = [r for r in rows if r.get("detail", {}).get("phases")]
    if not sel:
        return ""
    keys = ("data", "forward", "weight_wrappers", "backward", "optimizer", "other", "total")
    body = [[r["host"], r["model"], "TrainLoraNode" if r["who"] == "host" else "ours",
             *(_f(r["detail"]["phases"].get(k), "{:.3f}") for k in keys)] for r in sel]
    return _table(["ComfyUI", "model", "trainer", "data", "forward", "(of it: weight wrappers)", "backward",
                   "optimizer", "other", "step"], body)
