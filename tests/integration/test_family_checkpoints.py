"""The tiny family checkpoints (family_checkpoints.py) load through the host's own loaders as their family.

Per family, on the host copy this run uses (COMFYUI_DIR, see conftest.py):
  - the diffusion model loads through the stock UNETLoader node (`comfy.sd.load_diffusion_model`) as the
    family's model class, with the family's detected config, and with exactly the file's tensors;
  - its sampling is flow matching (ModelSamplingDiscreteFlow / ModelSamplingFlux, CONST);
  - the text encoder(s) load with `comfy.sd.load_clip(..., clip_type=...)` (no tensor missing) and
    encode a prompt;
  - one `apply_model` on CPU, with the conds the host's own `extra_conds` makes from that encoding,
    returns a finite tensor of the latent's shape (and Flux dev's output depends on the guidance cond,
    schnell's does not);
and the VAE loads through the stock VAELoader with 16 latent channels and decodes.
A family the host copy does not detect is skipped there, with the reason.
"""
from __future__ import annotations

import gc
import time

import pytest

import family_checkpoints as fc

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def comfy_host(host):
    """The host in process (conftest's `host`), with the fixture cache as a model folder of the loaders."""
    for kind in ("diffusion_models", "vae"):
        host.add_model_folder_path(kind, str(fc.cache_dir()))
    yield host
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()


def _files(name):
    try:
        return fc.ensure_family(name)
    except fc.FamilyUnsupported as e:
        pytest.skip(str(e))


def _node(name):
    import nodes  # ComfyUI's own nodes.py (conftest puts the host first on sys.path)

    return nodes.NODE_CLASS_MAPPINGS[name]()


def _file_keys(path):
    """The file's tensor names (as meta tensors of their shapes: no data read)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}


def _model_conds(model, noise, encoded):
    """The kwargs apply_model gets from a sampler: the host's extra_conds on the CLIP's output, processed
    for the batch (as comfy.samplers does)."""
    import torch

    params = dict(encoded)
    params["cross_attn"] = params.pop("cond")
    conds = model.model.extra_conds(noise=noise, device=torch.device("cpu"), width=noise.shape[-1] * 8,
                                    height=noise.shape[-2] * 8, prompt_type="positive", **params)
    return {k: c.process_cond(batch_size=noise.shape[0], device=noise.device, area=None).cond
            for k, c in conds.items()}


@pytest.mark.parametrize("name", list(fc.FAMILIES))
def test_family_detected_flow_forward_and_text(comfy_host, name, capsys, caplog):
    import logging

    import torch
    import comfy.model_management
    import comfy.model_sampling

    files = _files(name)
    caplog.set_level(logging.WARNING)
    t0 = time.perf_counter()
    model = _node("UNETLoader").load_unet(files.diffusion_model.name, "default")[0]
    t_load = time.perf_counter() - t0

    # The family the host detected, with exactly the file's tensors (none missing, none unexpected).
    config = model.model.model_config
    assert type(config).__name__ == files.model_class
    assert {k: config.unet_config.get(k) for k in files.expect} == files.expect
    file_keys = set(config.process_unet_state_dict(_file_keys(files.diffusion_model)))
    assert file_keys == set(model.model.diffusion_model.state_dict())

    # Flow matching.
    sampling = model.get_model_object("model_sampling")
    assert isinstance(sampling, (comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.ModelSamplingFlux))
    assert comfy.model_sampling.CONST in type(sampling).__mro__

    # The text encoder(s), through the host's loader with the family's CLIP type.
    t0 = time.perf_counter()
    clip = files.load_clip()
    encoded = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True, return_dict=True)
    t_clip = time.perf_counter() - t0
    # Neither loader left a tensor of the model uninitialised nor ignored one of the files'.
    complaints = [r.getMessage()[:200] for r in caplog.records
                  if r.getMessage().startswith(("clip missing", "unet missing", "unet unexpected"))]
    assert not complaints
    cond = encoded["cond"]
    assert cond.ndim == 3 and cond.shape[0] == 1 and torch.isfinite(cond).all()
    if encoded.get("pooled_output") is not None:
        assert torch.isfinite(encoded["pooled_output"]).all()

    # One forward pass on CPU with the latent of a 64x64 image.
    torch.manual_seed(0)
    x = torch.randn(1, files.latent_channels, 8, 8)
    sigma = torch.tensor([0.7])
    kwargs = _model_conds(model, x, encoded)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.model.apply_model(x, sigma, **kwargs)
    t_fwd = time.perf_counter() - t0
    assert out.shape == x.shape
    assert torch.isfinite(out).all()

    if "guidance_embed" in files.expect:  # Flux: the guidance cond reaches guidance_in only in dev
        assert kwargs["guidance"].tolist() == [3.5]
        with torch.no_grad():
            out_g1 = model.model.apply_model(x, sigma, **{**kwargs, "guidance": torch.tensor([1.0])})
        assert torch.equal(out, out_g1) != files.expect["guidance_embed"]

    with capsys.disabled():
        print(f"\n[{name}] {files.model_class} {files.layout}: {type(sampling).__mro__[1].__name__} "
              f"shift={getattr(sampling, 'shift', None)} multiplier={getattr(sampling, 'multiplier', None)}; "
              f"extra conds {sorted(kwargs)}; context {tuple(cond.shape)}; UNETLoader {t_load:.1f}s, "
              f"clip load+encode {t_clip:.1f}s, forward {t_fwd:.2f}s")
    del model, clip, out
    comfy.model_management.unload_all_models()
    gc.collect()


def test_vae_loads_with_16_latent_channels_and_decodes(comfy_host):
    import torch

    files = _files("sd3")
    vae = _node("VAELoader").load_vae(files.vae.name)[0]
    assert vae.latent_channels == 16
    torch.manual_seed(0)
    image = vae.decode(torch.randn(1, 16, 4, 4))
    assert tuple(image.shape[-3:]) == (32, 32, 3)
    assert torch.isfinite(image).all()
