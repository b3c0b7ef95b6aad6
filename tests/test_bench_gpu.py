"""bench/gpu.sh's plan, card table, result rows and table, nvidia-smi polling and the Flux runner,
checked on a CPU (the GPU run itself needs a GPU: bench/README.md, "GPU run")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu import cards, cli, predict
from bench.gpu.plan import CLASS_IMAGES, make_plan
from bench.gpu.smi import SmiPoller, parse_mib
from bench.gpu.table import format_table, make_result, speedups

REPO = Path(__file__).resolve().parents[1]


def test_plan_rows_models_and_comparisons():
    rows = make_plan()
    assert [(r.model, r.trainer, r.precision) for r in rows] == [
        ("sd15", "reference", "bf16"), ("sd15", "ours", "bf16"), ("flux", "ours", "bf16"), ("flux", "ours", "fp8"),
        ("sdxl", "reference", "bf16"), ("sdxl", "ours", "bf16")]
    assert {r.model: r.resolution for r in rows} == {"sd15": 512, "sdxl": 1024, "flux": 1024}
    assert len({r.key for r in rows}) == len(rows)
    for r in rows:
        assert 1 <= r.warmup and 1 <= r.measure and r.steps <= 13, r.key  # few steps: the run has 8 minutes
        assert r.compares and r.settings and r.prediction
        assert (r.runner == "reference") == (r.script is not None)
    assert {r.script for r in rows if r.script} == {"train_dreambooth_lora.py", "train_dreambooth_lora_sdxl.py"}
    assert [r.runner for r in rows if r.model == "flux"] == ["flux", "flux"]  # no reference script for Flux
    assert all(q.steps <= r.steps for q, r in zip(make_plan(quick=True), rows))
    assert [r.model for r in make_plan(models=["flux"])] == ["flux", "flux"]
    with pytest.raises(SystemExit, match="unknown"):
        make_plan(models=["sd3"])


def test_every_row_has_a_stored_prediction_of_its_setting():
    data, table = predict.load(), predict.settings()
    for r in make_plan():
        family, setting = table[r.prediction]
        assert family == r.model
        stored = data["predictions"][r.prediction]
        assert stored["setting"]["base"] == r.precision and stored["peak"] > 2 ** 30
    sd = {k: s for k, (_, s) in table.items() if not k.startswith("flux")}
    assert all(s.lora_targets == "attention" for s in sd.values())  # the reference's set, as both trainers run
    assert sd["sd15:reference"].encoders_on_gpu and sd["sd15:reference"].checkpointing == "off"
    assert sd["sdxl:ours"].checkpointing == "attention-hires" and not sd["sdxl:ours"].encoders_on_gpu


@pytest.mark.parametrize("name,card,tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4), ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H200", "H200 SXM", 989.4), ("NVIDIA GH200 480GB", "GH200", 989.4),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0), ("NVIDIA A10", "A10", 125.0), ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA L40S", "L40S", 362.1), ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090", 165.2),
    ("Tesla T4", "T4", None), ("NVIDIA A10G", None, None), ("", None, None)])
def test_datasheet_lookup(name, card, tflops):
    assert cards.datasheet_bf16_tflops(name) == (card, tflops)


def _fake(row, s_per_step=0.5, flops=200e12, alloc_mib=3 * 1024):
    summary = {"s_per_step": s_per_step, "wall_s": 40.0, "to_first_step_end_s": 20.0, "steps_recorded": 13,
               "cuda_training_peak_mib": alloc_mib, "cuda_peak_mib": alloc_mib * 1.2}
    record = {"flops_per_step": flops, "cuda_phases_bytes": {"steps_2_to_n": {"max_allocated": alloc_mib * 2**20,
                                                                             "max_reserved": 4 * 2**30}}}
    return make_result(row, summary=summary, record=record, smi_peak_mib=5 * 1024, measured_tflops=800.0,
                       datasheet_tflops=1000.0, prediction={"peak": 2 * 2**30, "setting": {"label": "x"}})


def test_result_row_mfu_and_measured_over_predicted():
    ref, ours = make_plan()[:2]
    r = _fake(ours)
    assert r["it_per_s"] == 2.0 and r["tflop_per_step"] == 200.0 and r["achieved_tflops"] == 400.0
    assert r["mfu_measured_peak"] == 0.5 and r["mfu_datasheet"] == 0.4
    assert r["peak_alloc_gib"] == 3.0 and r["smi_peak_gib"] == 5.0 and r["peak_reserved_gib"] == 4.0
    assert r["predicted_gib"] == 2.0 and r["measured_over_predicted"] == 1.5
    json.dumps(r)  # the JSON row
    failed = make_result(ref, status="failed", error="boom\ntrace", prediction={"peak": 2**31})
    assert failed["it_per_s"] is None and failed["mfu_datasheet"] is None and failed["predicted_gib"] == 2.0
    results = {"card": {"name": "NVIDIA H100 80GB HBM3", "datasheet_card": "H100 SXM", "datasheet_bf16_tflops": 989.4,
                        "measured_bf16_tflops": 790.0}, "rows": [_fake(ref, s_per_step=1.0, alloc_mib=4096), r, failed]}
    table = format_table(results)
    lines = table.splitlines()
    assert "datasheet 989.4 TFLOP/s" in lines[0] and "measured (bench.peak) 790.0" in lines[0]
    header = lines[2]
    for col in ("it/s", "peak alloc GiB", "nvidia-smi GiB", "TFLOP/step", "MFU (measured peak)", "MFU (datasheet)",
                "predicted GiB", "measured/predicted"):
        assert col in header
    assert ("| SD1.5-shaped (random) | ours | 512 | 2.00 | 3.00 | 5.00 | 200.00 | 50.0 % | 40.0 % | 2.00 | 1.50 |"
            in table)
    assert "FAILED: boom" in lines[-1] and "trace" not in lines[-1]
    assert speedups(results["rows"]) == ["SD1.5-shaped (random) 512 px: ours x2.00 the reference's it/s at 0.75 of "
                                         "its peak allocated"]


def test_smi_poller_windows_and_parsing():
    assert parse_mib("1234\n") == 1234.0 and parse_mib("N/A\n") is None
    values = iter([100.0, 900.0, 300.0] + [50.0] * 1000)
    smi = SmiPoller(interval=0.01, read=lambda: next(values)).start()
    while len(smi.samples) < 4:
        pass
    smi.stop()
    t = [s[0] for s in smi.samples]
    assert smi.baseline() == 100.0
    assert smi.peak_between(t[0], t[-1]) == 900.0 and smi.peak_between(t[2], t[-1]) == 300.0
    assert smi.peak_between(t[-1] + 1, t[-1] + 2) is None


def test_dry_run_prints_every_row_and_its_command(capsys):
    assert cli.main(["--dry-run", "--python", "PY"]) == 0
    out = capsys.readouterr().out
    for r in make_plan():
        assert f"{r.key}: " in out
    cmds = [line for line in out.splitlines() if line.startswith("   $ PY -m bench.child")]
    assert len(cmds) == 6 and all("--flops-step" in c for c in cmds)
    assert sum("--mixed_precision bf16" in c for c in cmds) == 2  # the reference rows
    assert sum("--mixed-precision bf16" in c and "--thumbnail-steps 0" in c for c in cmds) == 2  # ours
    assert sum("bench.gpu_flux" in c and "--resolution 1024 --device cuda" in c for c in cmds) == 2
    assert f"--num_class_images {CLASS_IMAGES}" in out and "class_renders" in out


def test_gpu_sh_dry_run_names_its_python_and_the_plan(tmp_path):
    env = dict(os.environ, BENCH_GPU_OUTPUT=str(tmp_path), BENCH_PYTHON=sys.executable, BENCH_GPU_ALLOW_CPU="1",
               BENCH_GPU_MODULES="torch diffusers")  # the core's .venv has no torchvision
    p = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--models", "flux"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"python: {sys.executable}" in p.stdout and "flux_ours_fp8" in p.stdout and "sd15" not in p.stdout
    assert (tmp_path / "gpu.log").is_file()


def test_flux_runner_tiny_on_cpu_both_bases(capsys):
    from bench import gpu_flux

    spec = gpu_flux.architectures.reduced_specs()["flux"]
    spec = gpu_flux.dataclasses.replace(spec, resolution=64)
    p = gpu_flux.prepare(spec, gpu_flux.setting_for("fp8"), torch.device("cpu"))
    linears = [m for n, m in p.step_modules[0].named_modules() if isinstance(m, torch.nn.Linear) and "lora" not in n]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert all(q.dtype == torch.float32 and q.device.type == "cpu" for q in p.params)
    assert all(torch.isfinite(q).all() for q in p.params) and not p.params[1].any()  # lora_up starts at zero
    loss = gpu_flux.step.train_step(p, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert gpu_flux.main(["--tiny", "--steps", "2", "--device", "cpu"]) == 0
    assert "step 2/2 loss" in capsys.readouterr().out


def test_smoke_run_writes_results_and_copies(tmp_path):
    """The runner end to end on the CPU (reduced Flux rows under bench.child): JSON, table, $OUT copies."""
    out, copy = tmp_path / "run", tmp_path / "OUT"
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--python", sys.executable, "--output", str(out),
                        "--copy-to", str(copy)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in results["rows"]] == ["flux_ours_bf16", "flux_ours_fp8"]
    for r in results["rows"]:
        assert r["status"] == "ok" and r["it_per_s"] > 0 and r["flops_per_step"] > 0 and r["mfu_measured_peak"] > 0
    assert sorted(x.name for x in copy.iterdir()) == ["logs.tar.gz", "results.json", "table.md"]
