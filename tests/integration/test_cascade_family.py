"""The comfy backend on Stable Cascade's stage C (the text-conditional prior): ε on StableCascadeSampling through
the transformer path's host pieces, in-process on the host's own objects, with a tiny checkpoint in the real
layout (family_checkpoints_cascade.py: Load Checkpoint's MODEL, CLIP-G and the stage C VAE, EfficientNet
encoder and previewer decoder).

Checked, as test_dit_families.py checks the discrete-schedule transformers:
  - the schedule is the host's cosine table at shift 1 (stage C trained unshifted; the host samples at 2), ε;
    the backend's ε at integer timesteps is the host's own (`extra_conds`: clip_text, clip_text_pooled,
    clip_img; `apply_model` at that σ); the latents are StableCascade_StageC_VAEEncode's (compression 42);
  - class samples (the class-image cache) are kept as the latents the stock stage C KSampler makes with their
    seeds, beside their previews (the VAE decodes only the previewer's sketch, which would not encode back);
    a few LoRA steps of the core trainer with prior preservation on those latents lower the held-out ε
    loss of the identifier prompt; the file carries `lora_unet_` keys of the attention and MLP Linears and the
    family's metadata; the stock LoraLoader uses every key and changes the model as the trained MODEL does;
    the base MODEL stays bit-identical;
  - a sample (what DreamBooth's grids and thumbnails show) equals the stock graph's image with that seed:
    StableCascade_EmptyLatentImage, KSampler, VAEDecode of the stage C VAE (the previewer).
The whole file took 11 s (0.33) and 8 s (0.3.64) with the cache warm, 9 s (0.33) writing the checkpoint first,
on 2 cores shared with other jobs.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import family_checkpoints as fc  # noqa: E402
import family_checkpoints_cascade as fcc  # noqa: E402
from stock_graph import stock_image  # noqa: E402
from family_checks import check_lora_file_and_stock_loader, digest, host_velocity, train_with_prior  # noqa: E402

PROMPT = "a photo of sks dog"
SIZE = 336  # 8 x 8 stage C latents (336 // 42), the EfficientNet reading 256 px
BLOCK_LINEARS = ("attention_attn_to_q", "attention_attn_to_k", "attention_attn_to_v", "attention_attn_out_proj",
                 "kv_mapper_1")
_LOADED: dict = {}


def _load():
    if not _LOADED:
        try:
            files = fcc.ensure_family("stable_cascade_c")
        except fc.FamilyUnsupported as e:
            pytest.skip(str(e))
        with torch.inference_mode():
            _LOADED["c"] = (files, *fcc.load(files))
    return _LOADED["c"]


def _cb(pack):
    return importlib.import_module(pack.__name__ + ".nodes.comfy_backend")


def _host_eps(backend, model, clip, prompt, noisy, t):
    """ε from the host's own path at the σ of the backend's schedule: its input x0 + σε = noisy·√(1+σ²)."""
    sigma = backend.schedule_sigmas[t]
    x = noisy * (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
    return host_velocity(model, clip, prompt, x, sigma)


def _photos(n, size, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = np.full((size, size, 3), 40, np.uint8)
        img[..., (i + seed) % 3] = 200
        a, b = size // 4, 3 * size // 4
        img[a:b, a:b] = (rng.random((b - a, b - a, 3)) * 255).astype(np.uint8)
        out.append(Image.fromarray(img))
    return out


def _pixels(images):
    return torch.stack([torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1) / 127.5 - 1 for im in images])


def test_schedule_latents_and_prediction_are_the_hosts(comfy_host, pack):
    import comfy.model_sampling as ms
    from comfy_extras.nodes_stable_cascade import StableCascade_StageC_VAEEncode

    files, model, clip, vae = _load()
    assert type(model.model.model_config).__name__ == files.model_class  # the host's own detection
    unet_config = model.model.model_config.unet_config
    assert {k: unet_config.get(k) for k in files.expect} == files.expect
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    assert backend.family == "stable-cascade-c" and backend.prediction_type == "epsilon"
    assert backend.latent_factor == 42 and backend.native_resolution == 1024

    # the host's cosine table at shift 1 (10⁴ points of t ∈ (0, 1]); the host samples at shift 2
    sampling = model.get_model_object("model_sampling")
    assert isinstance(sampling, ms.StableCascadeSampling) and sampling.shift == 2.0
    schedule = backend.schedule()
    assert schedule.kind == "discrete" and schedule.prediction_type == "epsilon"
    unshifted = ms.StableCascadeSampling()
    torch.testing.assert_close(schedule.alphas_cumprod, 1 / (1 + unshifted.sigmas ** 2))
    t = torch.tensor([999, 4999, 8999])  # inside the ends, where the host clamps ᾱ to [1e-4, 1 - 1e-4]
    torch.testing.assert_close(sampling.timestep(backend.schedule_sigmas[t]), (t + 1) / 1e4, atol=1e-4, rtol=0)
    assert not torch.allclose(sampling.sigmas, unshifted.sigmas)

    # the latents are the host's StageC_VAEEncode node's (compression 42)
    photos = _photos(2, SIZE, 0)
    with torch.no_grad():
        latents = backend.encode_images(_pixels(photos))
    assert latents.shape == (2, 16, SIZE // 42, SIZE // 42) and latents.std() > 0.1
    with torch.inference_mode():
        node = StableCascade_StageC_VAEEncode.execute((_pixels(photos).movedim(1, -1) + 1) / 2, vae, 42)
    torch.testing.assert_close(latents, node.result[0]["samples"].float())

    prompts = [PROMPT, "a dog"]
    x = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3000, 8000])
    with torch.no_grad():
        out = backend.predict(x, t, backend.encode_text(prompts, size=(252, 252)))
    assert out.shape == x.shape and out.dtype == torch.float32
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(out[i:i + 1], _host_eps(backend, model, clip, prompt, x[i:i + 1], t[i:i + 1]),
                                   rtol=1e-3, atol=1e-3)


def _eps_loss(backend, latents, cond, seed=1234):
    """The mean ε loss at fixed held-out noise and timesteps (not drawn by any training step)."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([2500, 5000, 7500])[: latents.shape[0]]
    batch = backend.schedule().noised(latents, noise, t)
    with torch.no_grad():
        eps = backend.predict(batch.noisy, t, cond)
    return float(((eps - batch.target) ** 2).mean())


def test_lora_training_with_prior_lowers_eps_loss_and_loads_in_the_stock_loader(comfy_host, pack, tmp_path, caplog):
    import comfy.lora

    files, model, clip, vae = _load()
    cb = _cb(pack)
    core = lambda m: importlib.import_module(pack.__name__ + ".dreambooth_core." + m)  # noqa: E731
    base_mod, cache_mod = core("backends.base"), core("class_images.cache")
    before = digest(model.model)
    backend = cb.ComfyBackend(model, clip, vae)

    # class samples: the stock KSampler's latents for their seeds, kept beside their previews
    assert backend.class_latents
    settings = base_mod.SampleSettings(steps=2, guidance=3.0, sampler="euler:simple", width=SIZE, height=SIZE)
    with torch.inference_mode():
        made = cache_mod.ensure_class_images(backend, tmp_path / "classes", "a photo of a dog", 2, settings, seed=3)
    classes = made.load(resolution=SIZE).items
    assert len(classes) == 2 and all(c.image.size == (SIZE, SIZE) for c in classes)
    for i, item in enumerate(classes):
        assert item.latent.shape == (16, SIZE // 42, SIZE // 42)
        torch.testing.assert_close(item.latent, _stock_latent(model, clip, "a photo of a dog", SIZE, SIZE, 3 + i))
    with pytest.raises(ValueError, match=r"made at 336x336 and are kept as that model's latents"):
        made.load(resolution=SIZE - 42)
    again = cache_mod.ensure_class_images(backend, tmp_path / "classes", "a photo of a dog", 2, settings, seed=3)
    assert (again.generated, again.reused) == (0, 2)

    targets = backend.lora_targets(True, False)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert all(key_map.get(n) == backend._target_keys[n][1] for n in targets)
    # per level, down and up: ResBlock (0) and AttnBlock (2) of the 'CTA' triple; no TimestepBlock mapper
    expected = set()
    for side in ("down", "up"):
        for level in range(fcc.LEVELS):
            expected |= {f"lora_unet_{side}_blocks_{level}_0_channelwise_{i}" for i in (0, 4)}
            expected |= {f"lora_unet_{side}_blocks_{level}_2_{n}" for n in BLOCK_LINEARS}
    assert set(targets) == expected

    instance = [SimpleNamespace(image=im, caption=PROMPT) for im in _photos(2, SIZE, 0)]
    with torch.no_grad():
        latents = backend.encode_images(_pixels([e.image for e in instance]))
        cond = backend.encode_text([PROMPT] * 2, size=(SIZE, SIZE))
    untrained = _eps_loss(backend, latents, cond)
    result = train_with_prior(pack, backend, instance, classes, tmp_path, "cascade_c", resolution=SIZE, steps=3,
                              lr=3e-3, checkpointing=True)
    trained = _eps_loss(cb.ComfyBackend(backend.result()[0], clip, vae), latents, cond)
    assert result.status == "completed" and trained < untrained, (untrained, trained)
    assert all(r["prior_loss"] > 0 for r in result.history), "every step trained on the class latents too"
    assert all("forward" not in vars(m) for m in model.model.diffusion_model.modules())

    x = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([6000])
    check_lora_file_and_stock_loader(
        comfy_host, model, clip, backend.result()[0], result.lora_path, set(targets),
        ("stable_cascade", "stable-cascade-v1-prior/lora", "stable-cascade-c", False), "cascade_c", caplog,
        lambda m, c: _host_eps(backend, m, c, PROMPT, x, t))
    assert digest(model.model) == before, "training changed the shared base MODEL's weights"


def _stock_latent(model, clip, prompt, width, height, seed):
    """The stage C latents of the stock graph: StableCascade_EmptyLatentImage, CLIPTextEncode, KSampler (2 Euler
    steps, CFG 3, no negative text)."""
    import nodes as host_nodes
    from comfy_extras.nodes_stable_cascade import StableCascade_EmptyLatentImage

    with torch.inference_mode():
        latent = StableCascade_EmptyLatentImage.execute(width, height, 42, 1).result[0]
        pos = host_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        neg = host_nodes.CLIPTextEncode().encode(clip, "")[0]
        samples = host_nodes.common_ksampler(model, seed, 2, 3.0, "euler", "simple", pos, neg, latent)[0]
    return samples["samples"][0].float()


def test_a_sample_is_the_stock_stage_c_graphs_image(comfy_host, pack):
    """The backend's sample (seed 7, 2 Euler steps, CFG 3 against "blurry", 336 x 252) is the stock graph's:
    StableCascade_EmptyLatentImage (compression 42), CLIPTextEncode, KSampler, VAEDecode (the previewer)."""
    from comfy_extras.nodes_stable_cascade import StableCascade_EmptyLatentImage

    files, model, clip, vae = _load()
    base = importlib.import_module(pack.__name__ + ".dreambooth_core.backends.base")
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    width, height = 336, 260  # 260: not a multiple of 42, floored as the node floors it
    settings = base.SampleSettings(steps=2, guidance=3.0, sampler="euler:simple", negative_prompt="blurry",
                                   width=width, height=height)
    with torch.inference_mode():
        ours = backend.generate(["a photo of a dog"], [7], settings)[0]
        latent = StableCascade_EmptyLatentImage.execute(width, height, 42, 1).result[0]
    stock = stock_image(model, clip, vae, "a photo of a dog", "blurry", latent, 7, 2, 3.0, "euler", "simple")
    assert ours.shape == ((height // 42) * 8, (width // 42) * 8, 3) and np.array_equal(ours, stock)
