"""The core job (dreambooth_core.job) that every host runs: checks before any work, class images,
training with the run's accumulation and precision, publishing, and Cancel in each phase."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_tiny_backend
from dreambooth_core.training.accel import _reset_state, make_accelerator
from dreambooth_core.config import TrainConfig
from dreambooth_core.job import Host, check_job, prepare_instance_images, run_job
from dreambooth_core.adapters import LoRAError
from dreambooth_core.dataset.tokens import TokenError
from dreambooth_core.training.trainer import train


class FolderHost(Host):
    """A host that publishes to its own folders and records what the job told it."""

    def __init__(self, root: Path, stop_after_images: int = 0, raise_after_images: int = 0):
        self.root, self.events = root, []
        self.stop_after_images, self.raise_after_images = stop_after_images, raise_after_images
        self.made = 0

    cancelled_by = (KeyboardInterrupt,)

    def class_image_root(self) -> Path:
        return self.root / "class_cache"

    def lora_destination(self, save_name: str) -> Path:
        return self.root / "loras" / f"{save_name}.safetensors"

    def published(self, path: Path, kind: str) -> None:
        self.events.append(("published", kind, path))

    def phase(self, name: str) -> None:
        self.events.append(("phase", name))

    def class_progress(self, done: int, total: int) -> None:
        self.made = done
        if self.raise_after_images and done >= self.raise_after_images:
            raise KeyboardInterrupt

    def should_stop(self) -> bool:
        return bool(self.stop_after_images) and self.made >= self.stop_after_images


def photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def job_config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(instance_dir=str(photos(tmp_path / "photos")), class_noun="star", steps=3, learning_rate=1e-2,
                num_class_images=2, class_steps=2, output_dir=str(tmp_path / "run"), save_name="star",
                save_precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def test_a_job_makes_class_images_trains_and_publishes_the_lora(tmp_path):
    backend, host = make_tiny_backend(), FolderHost(tmp_path)
    config = job_config(tmp_path)
    check_job(config, host, tokenizers=backend.tokenizers(), native_resolution=backend.native_resolution)
    assert config.resolution == 16, "the model's resolution fills in an unset one"
    result = run_job(backend, config, prepare_instance_images(config), host)

    assert (result.status, result.phase, result.step) == ("completed", "published", 3)
    assert [e for e in host.events if e[0] == "phase"] == [("phase", "class_images"), ("phase", "training"),
                                                           ("phase", "publishing")]
    assert result.class_images.generated == 2 and len(result.class_images.paths) == 2
    assert str(result.class_images.folder).startswith(str(tmp_path / "class_cache"))
    published = tmp_path / "loras" / "star.safetensors"
    assert result.lora_path == published and ("published", "lora", published) in host.events
    assert published.read_bytes() == (tmp_path / "run" / "star.safetensors").read_bytes()
    ups = [v for k, v in load_file(published).items() if k.endswith("lora_up.weight")]
    assert any(v.abs().max() > 0 for v in ups), "the published LoRA carries what was trained"
    assert not list((tmp_path / "loras").glob("*.partial"))

    again = run_job(make_tiny_backend(), job_config(tmp_path / "again", resolution=16), prepare_instance_images(config),
                    FolderHost(tmp_path))
    assert (again.class_images.generated, again.class_images.reused) == (0, 2), "class images are reused"


@pytest.mark.parametrize("how", ["flag", "exception"])
def test_cancel_while_class_images_are_made_keeps_them_and_trains_nothing(tmp_path, how):
    backend = make_tiny_backend()
    host = FolderHost(tmp_path, **({"stop_after_images": 1} if how == "flag" else {"raise_after_images": 1}))
    config = job_config(tmp_path, num_class_images=3, resolution=16)
    host.class_batch_size = 1
    result = run_job(backend, config, prepare_instance_images(config), host)
    assert (result.status, result.phase, result.step) == ("cancelled", "class_images", 0)
    assert 1 <= len(list((tmp_path / "class_cache").rglob("*.png"))) < 3, "what was made is kept, not all of it"
    assert not (tmp_path / "run").exists() and not (tmp_path / "loras").exists()


def test_cancel_during_training_keeps_a_checkpoint_and_publishes_nothing(tmp_path):
    class StopAtStep2(FolderHost):
        def callbacks(self):
            callbacks = super().callbacks()
            callbacks.on_step = lambda info: setattr(self, "stop_after_images", 0 if info.step < 2 else -1)
            return callbacks

        def should_stop(self) -> bool:
            return self.stop_after_images == -1

    config = job_config(tmp_path, resolution=16, prior=False)
    result = run_job(make_tiny_backend(), config, prepare_instance_images(config), StopAtStep2(tmp_path))
    assert (result.status, result.phase, result.step) == ("cancelled", "training", 2)
    assert result.checkpoint_path and Path(result.checkpoint_path).is_file()
    assert not (tmp_path / "loras").exists()


def test_a_host_run_takes_gradient_accumulation_as_the_command_line_does(tmp_path):
    """Hosts used to get an Accelerator without the run's accumulation: every micro-step was a full
    optimizer step. A host's run now reaches exactly the weights of a run with the trainer's own
    Accelerator, and differs from one without accumulation."""
    config = job_config(tmp_path, resolution=16, prior=False, gradient_accumulation=2, steps=2)
    data = prepare_instance_images(config)
    hosted = run_job(make_tiny_backend(), config, data, FolderHost(tmp_path))
    own = train(make_tiny_backend(), job_config(tmp_path / "own", resolution=16, prior=False, gradient_accumulation=2,
                                                steps=2), data.items, flip=data.flip)
    single = train(make_tiny_backend(), job_config(tmp_path / "one", resolution=16, prior=False, steps=2),
                   data.items, flip=data.flip)
    a, b, c = (load_file(p) for p in (hosted.lora_path, own.lora_path, single.lora_path))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    acc = make_accelerator(config, torch.device("cpu"), reset=True)
    assert (acc.gradient_accumulation_steps, acc.mixed_precision) == (2, "no")


def test_a_host_run_takes_the_run_s_mixed_precision(tmp_path):
    config = job_config(tmp_path, mixed_precision="bf16")
    try:
        assert Host().accelerator(config, torch.device("cpu")).mixed_precision == "bf16"
    finally:  # accelerate's state is process-wide: leave none behind for the next test's Accelerator
        _reset_state()


def test_the_job_refuses_before_any_work(tmp_path):
    backend, host = make_tiny_backend(), FolderHost(tmp_path)
    with pytest.raises(ValueError, match="save name 'sub/star'"):
        check_job(job_config(tmp_path, save_name="sub/star"), host)
    foreign = tmp_path / "loras" / "star.safetensors"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"not ours")
    with pytest.raises(LoRAError, match="star.safetensors"):
        check_job(job_config(tmp_path / "b"), host)
    foreign.unlink()
    with pytest.raises(TokenError):
        check_job(job_config(tmp_path / "c", token="xxy5syt00"), host, tokenizers=backend.tokenizers())
    with pytest.raises(ValueError, match="instance_dir"):
        prepare_instance_images(TrainConfig(class_noun="star"))


def test_a_half_precision_base_on_an_accelerator_trains_under_autocast():
    """The WebUI holds its UNet in fp16 on a GPU: the run then needs autocast with loss scaling (issue 33,
    fault 5); a precision the user chose, a full-precision base and CPU runs keep theirs."""
    from dreambooth_core.training.accel import mixed_precision_for

    cuda = torch.device("cuda", 0)
    assert mixed_precision_for("no", torch.float16, cuda) == "fp16"
    assert mixed_precision_for("no", torch.bfloat16, cuda) == "bf16"
    assert mixed_precision_for("no", torch.float32, cuda) == "no"
    assert mixed_precision_for("bf16", torch.float16, cuda) == "bf16"
    assert mixed_precision_for("no", torch.float16, torch.device("cpu")) == "no"


def test_min_snr_on_a_flow_model_is_refused_before_the_class_images_are_made(tmp_path):
    from dreambooth_core.training.objective import FlowSchedule

    backend = make_tiny_backend()
    backend.schedule = lambda: FlowSchedule(shift=3.0)
    config = job_config(tmp_path, resolution=16, min_snr_gamma=5.0)
    with pytest.raises(ValueError, match="min_snr_gamma=5"):
        run_job(backend, config, prepare_instance_images(config), FolderHost(tmp_path))
    assert not (tmp_path / "class_cache").exists()
