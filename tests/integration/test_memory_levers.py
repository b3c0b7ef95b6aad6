"""Memory levers of issue 33 that ComfyUI provides and the pack must respect while training.

fp8 base: the host's UNETLoader offers `weight_dtype` fp8_e4m3fn / fp8_e5m2, which stores the
diffusion model's Linear weights in 1 byte each and casts them per forward (`comfy.ops`' manual
cast). Training a LoRA on such a model must keep them so: no upcast copy of the model, the stored
bytes untouched, and the LoRA still learning (its forward and the frozen backward both read the
weight through the host's cast)."""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import family_checkpoints as fc  # noqa: E402

PROMPT = "a photo of sks dog"


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_a_lora_trains_on_an_fp8_base_and_leaves_it_fp8(comfy_host, pack, dtype, tmp_path):
    import comfy.sd
    from PIL import Image

    fp8 = getattr(torch, dtype)
    files = fc.ensure_family("sd3")
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(files.diffusion_model), model_options={"dtype": fp8})
        clip, vae = files.load_clip(), files.load_vae()
    dm = model.model.diffusion_model
    linears = [m for m in dm.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == fp8 for m in linears), "the host loaded this model in fp8"
    stored = {id(m): m.weight.clone() for m in linears}

    cb = importlib.import_module(pack.__name__ + ".nodes.comfy_backend")
    core = lambda m: importlib.import_module(pack.__name__ + ".dreambooth_core." + m)  # noqa: E731
    config_mod, trainer_mod = core("config"), core("training.trainer")
    backend = cb.ComfyBackend(model, clip, vae)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    instance = [SimpleNamespace(image=im, caption=PROMPT) for im in images]

    with torch.no_grad():
        latents = backend.encode_images(torch.stack([torch.from_numpy(np.asarray(im, np.float32))
                                                     .permute(2, 0, 1) / 127.5 - 1 for im in images]))
        cond = backend.encode_text([PROMPT] * 3, size=(64, 64))

    def held_out(backend) -> float:
        g = torch.Generator().manual_seed(1234)
        noise = torch.randn(latents.shape, generator=g)
        sigma = torch.tensor([0.3, 0.5, 0.7])
        s = sigma.view(-1, 1, 1, 1)
        with torch.no_grad():
            v = backend.predict((1 - s) * latents + s * noise, sigma, cond)
        return float(((v - (noise - latents)) ** 2).mean())

    untrained = held_out(backend)
    config = config_mod.TrainConfig(token="sks", class_noun="dog", resolution=64, prior=False, rank=4, steps=4,
                                    learning_rate=1e-2, batch_size=1, seed=0, output_dir=str(tmp_path),
                                    save_name=f"fp8_{dtype}", save_precision="fp32", max_grad_norm=0.0,
                                    thumbnail_steps=0)
    peaks = []

    def on_step(info):
        peaks.append(backend.frozen_copied_bytes)

    try:
        with torch.inference_mode(False), torch.enable_grad():
            result = trainer_mod.train(backend, config, instance, [], callbacks=trainer_mod.Callbacks(on_step=on_step))
    finally:
        backend.release()
    trained = held_out(cb.ComfyBackend(backend.result()[0], clip, vae))  # the trained MODEL the node hands on
    assert result.status == "completed"
    assert trained < untrained, (untrained, trained)
    assert all(m.weight.dtype == fp8 for m in linears), "training changed the stored dtype of the base"
    assert all(torch.equal(m.weight.view(torch.uint8), stored[id(m)].view(torch.uint8)) for m in linears)
    fp8_bytes = sum(m.weight.nelement() for m in linears)
    assert max(peaks) < 0.01 * fp8_bytes, "the frozen fp8 weights were copied while training"
