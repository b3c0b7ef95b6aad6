"""The comfy backend on Flux 2 (FLUX.2-dev's layout and Mistral text encoder; ComfyUI 0.33 only) and Cosmos
Predict2 text-to-image (both hosts), which train through the generic rule of families.py, in-process on the
host's own objects, with tiny checkpoints in their real layout (family_checkpoints_f2.py; Cosmos loaded
through its detection scaffolding). Checked as test_flow_families_more.py checks Qwen-Image, AuraFlow and
HunyuanImage 2.1:
  - the backend's velocity is the host's own (its encoding, `extra_conds`, `apply_model`), and its schedule
    the host's: Flux 2's shift, Cosmos's COSMOS_RFLOW line in the core's σ (families.cosmos_max_sigma: the
    core's point and σ are converted to the host's σ_e = σ/(1 − σ) and x0 + σ_e·ε by the host's own
    `sigma` and `calculate_input`, and the output read back through its `calculate_denoised`);
  - a few LoRA steps of the core trainer with prior preservation (class images from `generate`) lower
    the held-out flow loss of the identifier prompt; the file carries `lora_unet_` keys of the blocks'
    attention and MLP Linears (no modulation) and the family's metadata; the stock LoraLoader uses every
    key and changes the model's output as the trained MODEL does; the base MODEL stays bit-identical;
  - the identifier is checked, and suggested, in the family's own tokenizer (Mistral's tekken BPE);
  - a class image equals the stock KSampler graph's image with that seed.
Cosmos's T5 pads every prompt to 512 tokens (the host's min_length); here it is left unpadded through the
host's own tokenizer option (`t5xxl_min_length` 1), as test_flow_families_more.py does for AuraFlow.
0.33's Cosmos attention calls comfy_kitchen's fused RMSNorm + RoPE, which has no backward: training goes
through the backend's switch to comfy_kitchen's eager version (flow_path._kitchen_with_backward).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import family_checkpoints_f2 as f2  # noqa: E402
import family_checkpoints_llm as fl  # noqa: E402
from family_checks import (Family, FamilySuite, assert_class_image_is_stock, check_detected,  # noqa: E402
                           check_lora_training, check_predict, comfy_backend, host_output, host_output_at_point,
                           host_x)

# the tokenizer classes (0.33 ships its own T5Tokenizer for T5, 0.3.64 uses transformers' fast one)
SUITE = FamilySuite({
    "flux2": Family("flux2", "lora_unet_double_blocks_0_img_attn_qkv", "flux_2_dev", "Flux.2-dev/lora",
                    tokenizers=("_BytePairView",), steps=4, lr=1e-2, checkpointing=True),
    "cosmos_predict2": Family("cosmos-predict2", "lora_unet_blocks_0_cross_attn_k_proj", "cosmos_predict2",
                              "cosmos-predict2/lora", tokenizers=("T5Tokenizer(Fast)?",), steps=4, lr=1e-2,
                              checkpointing=True, clip_options=(("t5xxl_min_length", 1),)),
}, ensure=f2.ensure_family, load=fl.load, host=host_output, save_prefix="f2_", detection=f2.cosmos_detection)
name = SUITE.fixture()


def test_predict_is_the_hosts_output(comfy_host, pack, name):
    files, model, clip, vae = loaded = SUITE.load(name)
    backend = check_detected(pack, loaded, SUITE[name])
    # the schedule is the host's: Flux 2's shift e^μ; Cosmos unshifted, on the line up to sigma_max's point
    sampling = model.get_model_object("model_sampling")
    schedule = backend.schedule()
    if name == "cosmos_predict2":
        assert (schedule.shift, schedule.max_sigma) == (1.0, pytest.approx(80 / 81)) and sampling.sigma_max == 80
    else:
        assert schedule.shift == pytest.approx(np.exp(2.02)) and schedule.max_sigma is None
    x = torch.randn(2, files.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.35, 0.8])
    out, cond = check_predict(backend, model, clip, host_output_at_point, x, sigma, (64, 64))
    # through apply_model itself where a node wraps it (v = (x − denoised)/σ on the core's line): the same
    import comfy.patcher_extension as pe

    calls = []
    wrapped = model.clone()
    wrapped.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test",
                                 lambda run, *a, **k: calls.append(1) or run(*a, **k))
    with torch.no_grad():
        out_wrapped = comfy_backend(pack).ComfyBackend(wrapped, clip, vae).predict(x, sigma, cond)
    assert calls
    torch.testing.assert_close(out_wrapped, out, rtol=1e-3, atol=1e-3)


def test_lora_training_lowers_flow_loss_and_loads_in_the_stock_loader(comfy_host, pack, name, tmp_path, caplog):
    check_lora_training(comfy_host, pack, SUITE, name, tmp_path, caplog, excluded=r"mod|embed|final|norm")


def test_class_images_are_the_stock_ksampler_images(comfy_host, pack, name):
    """The backend's class image is the PNG of a stock graph with that seed: CLIPTextEncode, the family's empty
    latent, KSampler, VAEDecode."""
    files, model, clip, vae = SUITE.load(name)
    assert_class_image_is_stock(pack, model, clip, vae, latent=lambda f: {
        "samples": host_x(model, torch.zeros([1, files.latent_channels, 48 // f, 64 // f]))})
