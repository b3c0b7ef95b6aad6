"""One result per plan row (the numbers results.json keeps) and the table printed at the end.

it/s = 1 / steady s/step (bench.child's optimizer-step stamps after W warm-up steps); peak
allocated = torch.cuda.max_memory_allocated over training steps 2..N (what the estimator
predicts: the step's tensors); nvidia-smi = the card's memory.used at its highest while the child
ran (whole process: loading, caching, CUDA context, allocator reserve); TFLOP/step = one counted
step (FlopCounterMode: forward, backward with any checkpointing recompute, optimizer); MFU =
TFLOP/step x it/s / peak, against the bf16 matmul peak measured in the same run and against the
card's datasheet bf16 dense peak."""
from __future__ import annotations

from dataclasses import asdict
from typing import Dict, List, Optional

from .plan import GpuRow

GIB = 2 ** 30


def _r(x: Optional[float], nd: int = 3) -> Optional[float]:
    return None if x is None else round(x, nd)


def make_result(row: GpuRow, *, summary: Optional[dict] = None, record: Optional[dict] = None,
                smi_peak_mib: Optional[float] = None, measured_tflops: Optional[float] = None,
                datasheet_tflops: Optional[float] = None, prediction: Optional[dict] = None,
                prediction_stale: bool = False, status: str = "ok", error: Optional[str] = None) -> Dict:
    """The JSON row of one plan row from its child's summary (bench.proc.ChildResult.summary) and
    record; every row carries its prediction and MFU fields, None where not measured."""
    summary, record = summary or {}, record or {}
    s = summary.get("s_per_step")
    flops = record.get("flops_per_step")
    train_mib = summary.get("cuda_training_peak_mib")
    phases = record.get("cuda_phases_bytes", {})
    reserved = phases.get("steps_2_to_n", {}).get("max_reserved")
    achieved = flops / s / 1e12 if flops and s else None
    predicted = prediction.get("peak") / GIB if prediction and prediction.get("peak") else None
    measured_gib = train_mib / 1024 if train_mib else None
    out = {**asdict(row), "label": row.label, "runner": row.runner, "script": row.script, "status": status,
           "error": error, "s_per_step": s, "it_per_s": _r(1 / s) if s else None, "wall_s": summary.get("wall_s"),
           "setup_s": summary.get("to_first_step_end_s"), "steps_recorded": summary.get("steps_recorded"),
           "peak_alloc_gib": _r(measured_gib), "peak_alloc_process_gib":
               _r(summary["cuda_peak_mib"] / 1024) if summary.get("cuda_peak_mib") else None,
           "peak_reserved_gib": _r(reserved / GIB) if reserved else None,
           "smi_peak_gib": _r(smi_peak_mib / 1024) if smi_peak_mib else None,
           "flops_per_step": flops, "tflop_per_step": _r(flops / 1e12) if flops else None,
           "achieved_tflops": _r(achieved, 1),
           "mfu_measured_peak": _r(achieved / measured_tflops, 4) if achieved and measured_tflops else None,
           "mfu_datasheet": _r(achieved / datasheet_tflops, 4) if achieved and datasheet_tflops else None,
           "predicted_gib": _r(predicted), "prediction_stale": prediction_stale if prediction else None,
           "prediction_setting": (prediction or {}).get("setting", {}).get("label"),
           "measured_over_predicted": _r(measured_gib / predicted) if measured_gib and predicted else None}
    return out


def _f(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def format_table(results: Dict) -> str:
    """Markdown: the card and its peaks, then one line per row (failed and skipped rows say so)."""
    card = results.get("card", {})
    head = (f"GPU: {card.get('name', '?')} ({card.get('datasheet_card') or 'not in the datasheet table'}); "
            f"bf16 dense peak: datasheet {_f(card.get('datasheet_bf16_tflops'), '.1f')} TFLOP/s, "
            f"measured (bench.peak) {_f(card.get('measured_bf16_tflops'), '.1f')} TFLOP/s")
    lines = [head, "",
             "| model | trainer | px | it/s | peak alloc GiB | nvidia-smi GiB | TFLOP/step | MFU (measured peak) | "
             "MFU (datasheet) | predicted GiB | measured/predicted |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.get("rows", []):
        who = r["trainer"] + ("" if r["precision"] == "bf16" else f" ({r['precision']})")
        if r["status"] != "ok":
            why = (r.get("error") or "").splitlines()[0][:80] if r.get("error") else ""
            status = r["status"].upper() + (f": {why}" if why else "")
            lines.append(f"| {r['label']} | {who} | {r['resolution']} | {status} | | | | | | "
                         f"{_f(r.get('predicted_gib'), '.2f')} | |")
            continue
        stale = " (stale)" if r.get("prediction_stale") else ""
        lines.append(f"| {r['label']} | {who} | {r['resolution']} | {_f(r['it_per_s'], '.2f')} | "
                     f"{_f(r['peak_alloc_gib'], '.2f')} | {_f(r['smi_peak_gib'], '.2f')} | "
                     f"{_f(r['tflop_per_step'], '.2f')} | {_pct(r['mfu_measured_peak'])} | "
                     f"{_pct(r['mfu_datasheet'])} | "
                     f"{_f(r['predicted_gib'], '.2f')}{stale} | {_f(r['measured_over_predicted'], '.2f')} |")
    return "\n".join(lines)


def speedups(rows: List[Dict]) -> List[str]:
    """'SD1.5 512 px: ours x1.62 the reference's it/s at 0.71 of its peak allocated' per model with both."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ref = next((r for r in rows if r["model"] == model and r["trainer"] == "reference" and r["it_per_s"]), None)
        ours = next((r for r in rows if r["model"] == model and r["trainer"] == "ours" and r["it_per_s"]), None)
        if ref and ours:
            mem = (f" at {ours['peak_alloc_gib'] / ref['peak_alloc_gib']:.2f} of its peak allocated"
                   if ours.get("peak_alloc_gib") and ref.get("peak_alloc_gib") else "")
            out.append(f"{ours['label']} {ours['resolution']} px: ours x{ours['it_per_s'] / ref['it_per_s']:.2f} "
                       f"the reference's it/s{mem}")
    return out
