"""The command line as a user runs it: a model folder, a photo folder, flags and config files."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_tiny_backend

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, launcher: list | None = None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = (launcher or [sys.executable, "-m"]) + ["dreambooth_core", *args]
    return subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = root / "tiny_model"
    make_tiny_backend().pipeline().save_pretrained(model, safe_serialization=True)
    rng = np.random.default_rng(0)
    for folder, n in (("instance", 3), ("class", 4)):
        (root / folder).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    return root


def common(ws: Path, out: str, *extra: str) -> list:
    return ["train", "--model", str(ws / "tiny_model"), "--instance-dir", str(ws / "instance"),
            "--class-noun", "star", "--class-dir", str(ws / "class"), "--output-dir", str(ws / out),
            "--resolution", "16", "--lr", "1e-2", "--save-precision", "fp32", *extra]


def lora_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def test_train_from_flags_and_config_file(workspace):
    cfg = workspace / "run.toml"
    cfg.write_text('[train]\nsteps = 3\nrank = 2\nseed = 5\ntoken = "ohwx"\n', encoding="utf-8")
    proc = run_cli(*common(workspace, "out_cfg", "--config", str(cfg), "--rank", "3"))
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((workspace / "out_cfg" / "config.json").read_text())["config"]
    assert saved["steps"] == 3 and saved["seed"] == 5 and saved["token"] == "ohwx"
    assert saved["rank"] == 3, "a flag overrides the config file"
    weights = lora_weights(workspace / "out_cfg" / "dreambooth_lora.safetensors")
    assert {v.shape[0] for k, v in weights.items() if k.endswith("lora_down.weight")} == {3}
    assert (workspace / "out_cfg" / "loss.png").is_file()
    assert "4 class images" in proc.stdout


def test_sample_renders_a_grid_with_the_lora(workspace):
    proc = run_cli(*common(workspace, "out_sample", "--steps", "2"))
    assert proc.returncode == 0, proc.stderr
    grid = workspace / "grid.png"
    proc = run_cli("sample", "--model", str(workspace / "tiny_model"), "--lora",
                   str(workspace / "out_sample" / "dreambooth_lora.safetensors"), "--prompts",
                   "a photo of {token} {class}", "a photo of a {class}", "--seeds", "1", "2", "--steps", "2",
                   "--resolution", "16", "--output", str(grid))
    assert proc.returncode == 0, proc.stderr
    with Image.open(grid) as im:
        assert im.width > 4 * 16 and im.height > 2 * 16


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model.safetensors"], "no such file"),
    (["--token", "zxqv"], "zxqv"),
    (["--lr", "-1"], "learning_rate"),
])
def test_bad_input_gives_a_clear_error(workspace, args, message):
    proc = run_cli(*common(workspace, "out_bad", "--steps", "1"), *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(workspace):
    """`accelerate launch` data parallelism: 2 processes × batch 1 == 1 process × batch 2."""
    one = run_cli(*common(workspace, "ddp_one", "--steps", "3", "--batch-size", "2", "--train-text-encoder"))
    assert one.returncode == 0, one.stderr
    # On a machine without GPUs, `--multi_gpu` starts the processes and the trainer makes them
    # gloo CPU processes.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    two = run_cli(*common(workspace, "ddp_two", "--steps", "3", "--batch-size", "1", "--train-text-encoder"),
                  launcher=launcher)
    assert two.returncode == 0, two.stderr + two.stdout
    a = lora_weights(workspace / "ddp_one" / "dreambooth_lora.safetensors")
    b = lora_weights(workspace / "ddp_two" / "dreambooth_lora.safetensors")
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        # Adam turns float reduction-order noise on near-zero gradients into ~1e-5 differences.
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-3, atol=1e-4, err_msg=k)
        moved += int(k.endswith("lora_up.weight") and a[k].abs().max() > 0)
    assert moved > 0, "training must have moved the LoRA for the comparison to mean anything"


def test_sampling_does_not_warn_about_a_missing_torchvision(tmp_path):
    """The CLI's environment has no torchvision; transformers' image processors, loaded with the
    pipeline classes but never used by them here, would warn that it is missing on every run."""
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed: transformers has nothing to warn about")
    except ImportError:
        pass
    proc = run_cli("sample", "--prompts", "a photo of a star", "--class-noun", "star", "--seeds", "1", "--steps", "2",
                   "--output", str(tmp_path / "grid.png"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "grid.png").is_file()
    assert "torchvision" not in proc.stdout + proc.stderr


def test_ctrl_c_stops_after_the_step_keeps_a_checkpoint_and_resume_finishes(workspace):
    import json
    import signal
    import time

    from safetensors import safe_open

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = common(workspace, "ctrl_c", "--steps", "5000", "--rank", "2")
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth_core", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, deadline = "", time.monotonic() + 120
    while not any(int(n) >= 1 for n in re.findall(r"\| (\d+)/5000 \[", seen)):  # the bar shows a finished step
        assert proc.poll() is None and time.monotonic() < deadline, seen[-2000:]
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err[-2000:])
    assert "stopping after this step" in out
    step = int(out.split("cancelled at step ")[1].split(";")[0])
    assert 1 <= step < 5000
    ckpt = workspace / "ctrl_c" / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        assert json.loads(f.metadata()["dreambooth_checkpoint"])["step"] == step
    assert not list(ckpt.parent.glob("*.partial"))

    done = run_cli(*common(workspace, "ctrl_c", "--steps", str(step + 2), "--rank", "2", "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (workspace / "ctrl_c" / "dreambooth_lora.safetensors").is_file()


def test_the_terminal_says_what_a_resumed_run_changed(capsys):
    """The trainer reports settings changed since the checkpoint in a phase line; the command line
    shows it (single-word phases stay quiet)."""
    from dreambooth_core.cli.console import train_callbacks

    callbacks, bar = train_callbacks(3, disable=False)
    callbacks.on_phase("training")
    callbacks.on_phase("resuming at step 2 of 4 with settings changed since the checkpoint: steps 2 -> 4")
    bar.close()
    err = capsys.readouterr().err
    assert "resuming at step 2 of 4" in err and "\ntraining\n" not in err
