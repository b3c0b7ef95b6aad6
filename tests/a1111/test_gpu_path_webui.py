"""One full training step of the WebUI (A1111) backend with the model 'on CUDA', on a machine without a GPU.

gpu_step.py brings the WebUI up in-process (this extension loaded, the mini SD1.5 checkpoint loaded by
the WebUI itself), holds the model on the meta device as the WebUI holds it on a GPU (devices.device,
token ids, ᾱ there; fp16 weights and the WebUI's CUDA autocast without --no-half) and runs the job's own
steps for one training step (tests/meta_cuda.py: every op checked for one device as CUDA checks it, CUDA's
autocast for meta tensors), with prior preservation, for each crop (a non-square bucket beside square
class images: two forward passes) and precision: fp32 weights (--no-half); fp16 weights, where the job
autocasts in fp16 (mixed_precision_for) or in the bf16 the user asked for.

Catches: a tensor the backend, the WebUI's calls it makes (conditioning, first stage, apply_model), or the
trainer leave on the CPU and mix with the model's; a dtype clash where meta's kernels check dtypes under
that autocast. Cannot catch: a bias-free linear in another dtype than its weight, fp16 loss scaling (a
CUDA GradScaler reads its inf check back to the host), kernels or dtypes CUDA lacks, and any value.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from webui_server import A1111_DIR, hf_home, prepare_copy, repositories_dir

HERE = Path(__file__).resolve().parent
CASES = [f"{p}-{c}" for p in ("fp32", "fp16", "fp16-bf16") for c in ("center", "random", "bucket")]


@pytest.fixture(scope="module")
def steps(tmp_path_factory, mini_checkpoint) -> dict:
    """Every case's outcome, from one in-process WebUI (gpu_step.py) in a copy of the WebUI."""
    import os
    import shutil

    tmp = tmp_path_factory.mktemp("a1111-gpu")
    root = tmp / "webui"
    models = prepare_copy(A1111_DIR, root, repositories_dir(), [mini_checkpoint])
    shutil.copyfile(mini_checkpoint.with_suffix(".yaml"), models / mini_checkpoint.with_suffix(".yaml").name)
    env = dict(os.environ, HF_HOME=str(hf_home()), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, str(HERE / "gpu_step.py"), str(root), str(tmp / "data"),
                          str(models / mini_checkpoint.name)], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("GPU-STEP ")]
    assert out.returncode == 0 and lines, f"gpu_step.py failed ({out.returncode}):\n{out.stderr[-6000:]}"
    return json.loads(lines[-1][len("GPU-STEP "):])


@pytest.mark.parametrize("case", CASES)
def test_one_step_with_the_model_on_the_accelerator(steps, case):
    result = steps[case]
    assert "error" not in result, result.get("error")
    half = case.startswith("fp16")
    assert result["device"] == "meta" and result["latent_devices"] == ["meta"]
    assert result["weights"] == ("torch.float16" if half else "torch.float32")
    assert result["mixed_precision"] == {"fp32": "no", "fp16": "fp16", "fp16-bf16": "bf16"}[case.rsplit("-", 1)[0]]
    assert result["latent_sizes"] == ([[6, 10], [8, 8]] if case.endswith("bucket") else [[8, 8]])
