"""Start the real Automatic1111 WebUI for tests and tools: a temporary copy of ../shared/a1111 (read-only
source) with this repository's extension, a checkpoint and offline settings; see conftest.py."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
A1111_DIR = Path(os.environ.get("A1111_DIR", SHARED / "a1111")).resolve()
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", SHARED / "comfyui")).resolve()
CLIP_CONFIG = COMFYUI_DIR / "comfy" / "sd1_clip_config.json"
# What the WebUI imports that the core's environment lacks.
HOST_MODULES = ("gradio", "open_clip", "pytorch_lightning", "omegaconf", "torchsde", "clip")


def repositories_dir() -> Path:
    return Path(os.environ.get("A1111_REPOSITORIES") or A1111_DIR / "repositories").resolve()


def venv_python() -> Path:
    """The WebUI's Python: this one when it is the WebUI's venv, else .venv-a1111's."""
    return Path(sys.executable) if (Path(sys.prefix) / "hf-home").is_dir() else REPO / ".venv-a1111" / "bin" / "python"


def hf_home() -> Path:
    return Path(os.environ.get("A1111_HF_HOME") or venv_python().parent.parent / "hf-home")


def skip_reason() -> str:
    """Why the WebUI cannot be started from this Python ('' when it can)."""
    if not (A1111_DIR / "launch.py").is_file():
        return f"the WebUI source is not at {A1111_DIR} (set A1111_DIR)"
    missing = [m for m in HOST_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return (f"not running under the WebUI's Python ({sys.executable} lacks {', '.join(missing)}): run "
                "`bash tools/setup_a1111_env.sh` then `.venv-a1111/bin/python -m pytest tests/a1111`")
    if not all((repositories_dir() / repo / package).is_dir()
               for repo, package in (("stable-diffusion-stability-ai", "ldm"), ("generative-models", "sgm"))):
        return (f"the WebUI's repositories (stable-diffusion-stability-ai, k-diffusion, generative-models, BLIP, "
                f"stable-diffusion-webui-assets at the launcher's pinned commits) are not at {repositories_dir()}: "
                "set A1111_REPOSITORIES to a folder holding them")
    if not (hf_home() / "hub" / "models--openai--clip-vit-large-patch14").is_dir():
        return f"no offline CLIP tokenizer cache at {hf_home()}: run `bash tools/setup_a1111_env.sh`"
    return ""


SKIP_REASON = skip_reason()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _writable_copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("repositories", "*.zip", "screenshot.png"))
    for root, dirs, files in os.walk(dst):
        for name in dirs + files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
    os.chmod(dst, os.stat(dst).st_mode | stat.S_IWUSR)


class WebUI:
    """A running WebUI: base URL, its folder and its log."""

    def __init__(self, root: Path, port: int, log_path: Path, proc: subprocess.Popen):
        self.root, self.port, self.log_path, self.proc = root, port, log_path, proc
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **params):
        import requests

        return requests.get(self.url + path, params=params, timeout=120)

    def post(self, path: str, body=None, timeout: float = 600):
        import requests

        return requests.post(self.url + path, json=body if body is not None else {}, timeout=timeout)

    def wait_job(self, job_id: str, timeout: float = 300, until=None) -> dict:
        """Poll the status route until the job ends (or `until(status)` holds)."""
        end = time.time() + timeout
        while time.time() < end:
            status = self.get("/dreambooth/v1/status", id=job_id).json()
            if (until and until(status)) or not status["running"]:
                return status
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still running after {timeout} s: {status}\n{self.log()[-3000:]}")


def prepare_copy(source: Path, root: Path, repositories: Path, checkpoints: Iterable[Path]) -> Path:
    """A writable copy of a WebUI at `root` with its `repositories/` linked, this extension installed and
    `checkpoints` in its models folder (returned). Shared by the A1111 and Forge helpers."""
    _writable_copy(source, root)
    (root / "repositories").symlink_to(repositories, target_is_directory=True)
    # The extension as a user's clone holds it (the parts the WebUI loads, linked from this checkout;
    # not the checkout itself, whose git remotes the WebUI would try to read).
    ext = root / "extensions" / "dreambooth"
    ext.mkdir(parents=True)
    for part in ("scripts", "dreambooth_core", "install.py"):
        (ext / part).symlink_to(REPO / part)
    # Offline: the default live preview ("Approx NN") downloads a model at the first txt2img.
    (root / "config.json").write_text(json.dumps({"live_previews_enable": False}))
    models = root / "models" / "Stable-diffusion"
    models.mkdir(parents=True, exist_ok=True)
    for ckpt in checkpoints:
        (models / ckpt.name).symlink_to(ckpt)
    return models


def launch(root: Path, args: List[str], env: dict, log_path: Path, port: int, probe: str, name: str,
           start_timeout: float) -> WebUI:
    """Start `args` in `root` and return once GET `probe` answers 200; a start that exits or times out
    raises with the log's tail."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    webui = WebUI(root, port, log_path, proc)
    import requests

    deadline = time.time() + start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{webui.log()[-4000:]}")
        try:
            if requests.get(webui.url + probe, timeout=5).status_code == 200:
                return webui
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{name} did not answer within {start_timeout:.0f} s:\n{webui.log()[-4000:]}")


def start_webui(tmp: Path, checkpoint: Path, ui: bool = False, python: Optional[Path] = None,
                start_timeout: float = 600, others: Iterable[Path] = ()) -> WebUI:
    """Copy the WebUI into `tmp`, add the extension, the checkpoint (loaded at start) and `others` (each with its
    .yaml), start it; returns once the API answers (the checkpoint may still be loading: checkpoint_loaded)."""
    root = tmp / "webui"
    models = prepare_copy(A1111_DIR, root, repositories_dir(), [checkpoint, *others])
    for ckpt in (checkpoint, *others):
        shutil.copyfile(ckpt.with_suffix(".yaml"), models / ckpt.with_suffix(".yaml").name)
    port = _free_port()
    env = dict(os.environ, HF_HOME=str(hf_home()), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    args = [str(python or sys.executable), "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
            "--skip-python-version-check", "--use-cpu", "all", "--no-half", "--precision", "full", "--api",
            "--server-name", "127.0.0.1", "--port", str(port), "--skip-version-check", "--no-download-sd-model",
            "--loglevel", "DEBUG", "--ckpt", str(models / checkpoint.name)]
    if not ui:
        args.append("--nowebui")
    return launch(root, args, env, tmp / "webui.log", port, "/sdapi/v1/options", "the WebUI", start_timeout)


def stop_webui(webui: WebUI) -> None:
    webui.proc.terminate()
    try:
        webui.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        webui.proc.kill()
        webui.proc.wait()


def job_body(subject_dir, default_name: str, **overrides) -> dict:
    """A small LoRA job for POST /dreambooth/v1/train (2 class images, 2 steps at 64 px), saved as
    `default_name` unless `overrides` name it."""
    body = {"instance_dir": str(subject_dir), "token": "sks", "class_noun": "ball", "num_class_images": 2,
            "class_steps": 2, "resolution": 64, "steps": 2, "learning_rate": 5e-3, "save_name": default_name}
    body.update(overrides)
    return body


def txt2img(webui: "WebUI", prompt: str, seed: int = 7):
    """One 64 px, 2-step Euler image from the WebUI's own API, as a float array (checked not blank).
    With the WebUI's default emphasis ("Original"), as a user has it: the test checkpoints keep the mean
    it divides by away from zero."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    r = webui.post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": seed,
                                          "sampler_name": "Euler"})
    assert r.status_code == 200, r.text[:2000]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"), dtype=float)
    assert np.isfinite(image).all() and image.std() > 0, "txt2img gave a blank image"
    return image


def finished_lora(webui: "WebUI", job_id: str, save_name: str, timeout: float = 600,
                  text_encoders: Iterable[str] = ("lora_te",)):
    """Wait for a LoRA job with prior preservation and the text encoder, check what every host must give
    (the class-image phase reported, 2 class images made, steps 1-2 with a prior loss, the file in
    models/Lora with UNet keys and keys of each of `text_encoders` (SDXL: lora_te1, lora_te2), its
    metadata); returns (status, keys, metadata)."""
    from safetensors import safe_open

    seen = []

    def record(s: dict) -> bool:
        seen.append(s["state"])
        return False

    status = webui.wait_job(job_id, until=record, timeout=timeout)
    assert status["state"] == "completed", (status, webui.log()[-3000:])
    assert "class_images" in seen, f"the class-image phase was never reported: {seen}"
    assert status["class_images"]["generated"] == 2 and status["class_images"]["reused"] == 0
    assert [h["step"] for h in status["history"]] == [1, 2]
    assert all(h["prior_loss"] is not None for h in status["history"]), "prior preservation loss missing"
    lora = webui.root / "models" / "Lora" / f"{save_name}.safetensors"
    assert status["lora_path"] == str(lora) and lora.is_file()
    with safe_open(str(lora), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    for part in ("lora_unet_down_blocks_", "lora_unet_mid_block_attentions_0_", "lora_unet_up_blocks_",
                 *(f"{te}_text_model_encoder_layers_" for te in text_encoders)):
        assert any(k.startswith(part) for k in keys), f"no {part}* key in the LoRA"
    assert meta["dreambooth_token"] == "sks" and meta["dreambooth_prior_preservation"] == "true"
    return status, keys, meta


def write_subject(folder: Path) -> Path:
    """Three 64×64 photos of a 'subject' (a red disc on different backgrounds) in `folder` (inside the WebUI's
    own folder: the API refuses folders outside it)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    for i, bg in enumerate([(30, 90, 200), (40, 160, 60), (220, 210, 190)]):
        im = Image.new("RGB", (64, 64), bg)
        ImageDraw.Draw(im).ellipse((12 + 4 * i, 14, 50 + 4 * i, 52), fill=(200, 30, 30))
        im.save(folder / f"subject_{i}.png")
    return folder


@contextmanager
def checkpoint_loaded(webui: "WebUI", name: str, then: str) -> Iterator["WebUI"]:
    """The WebUI with checkpoint `name` (a file stem in its models folder) loaded, and `then` again after.
    The start's own load is waited for first (the token route reads the model, which waits for it): A1111 1.10
    fails a switch made while that load runs ("Cannot copy out of meta tensor"), with or without extensions."""
    assert webui.post("/dreambooth/v1/token", {"token": "sks"}).status_code == 200
    _load_checkpoint(webui, name)
    try:
        yield webui
    finally:
        _load_checkpoint(webui, then)


def _load_checkpoint(webui: "WebUI", stem: str) -> None:
    r = webui.post("/sdapi/v1/options", {"sd_model_checkpoint": stem})
    assert r.status_code == 200, r.text
    current = webui.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert current.startswith(stem + "."), f"the WebUI did not load {stem} (it has {current}):\n{webui.log()[-3000:]}"
