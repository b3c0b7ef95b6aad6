"""The comfy backend on the discrete-schedule transformers: PixArt α, PixArt Σ (ε) and Hunyuan-DiT v1.1/1.2 (v)
(families.py: the transformer path, its blocks and LoRA by the generic rule, on the discrete schedule of the
model's own sigmas), in-process on the host's own objects, with tiny checkpoints in each family's real layout
(family_checkpoints_dit.py).

Checked per family, as test_flow_families_more.py checks the flow ones:
  - the backend's ε / v at integer timesteps is the host's own (its encoding, with Hunyuan-DiT's mT5 beside
    its BERT, `extra_conds`, `apply_model`, whose learned-σ channels the diffusion model drops); on PixArt Σ
    also through a MODEL whose options wrap `apply_model` (then ε, or v behind the stock ModelSamplingDiscrete
    node, comes from its denoised output), and a MODEL re-patched to EDM sampling is refused by name;
  - a few LoRA steps of the core trainer with prior preservation (class images from `generate`) lower the
    held-out ε / v loss of the identifier prompt; the file carries `lora_unet_` keys of the blocks' attention and
    MLP Linears and the family's metadata; the stock LoraLoader uses every key and changes the model's
    output as the trained MODEL does; the base MODEL stays bit-identical; the identifier is checked in the
    tokenizers that read the prompt;
  - a class image equals the stock KSampler graph's image with that seed.
Both hosts hard-code PixArt's width (1152) and caption width (4096): one block is ~37 M parameters beside a
2-block, 4096-wide T5 (135 M, mostly its vocabulary); its images are at least 272 px, so the VAE is TAESD.
Hunyuan-DiT is 256 wide (45 M with its hard-coded text MLP and pooler). The whole file, cache warm, took 30 s
(0.33) and 36 s (0.3.64) on 2 cores shared with other jobs (load ~2.5).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import family_checkpoints_dit as fd  # noqa: E402
from family_checks import (PROMPT, Family, FamilySuite, assert_class_image_is_stock, check_detected,  # noqa: E402
                           check_lora_training, check_predict, comfy_backend, core, host_eps)

# PixArt's position embedding needs a mean latent side of 33 or more (family_checkpoints_dit.py): the
# smallest square it trains on is 272 px; predictions and the class image use the cheapest shape it
# takes, 2 x 64 latents (16 x 512 px: 32 tokens). Hunyuan-DiT's RoPE takes any size.
LATENT = (2, 64)
# The identifier is checked in the tokenizers that read the prompt (PixArt's T5; Hunyuan-DiT's BERT and mT5),
# which split "sks"; PixArt's suggestions are single pieces (the Hunyuan-DiT fixture's mT5 reads a 32000-piece
# stand-in vocabulary: no suggestion is checked there). PixArt Σ trains with gradient checkpointing on (the
# blocks recomputed), α off.
PIXART_T5 = ("T5Tokenizer(Fast)?",)
SUITE = FamilySuite({
    "pixart_alpha": Family("pixart-alpha", "lora_unet_blocks_0_cross_attn_kv_linear", "pixart_alpha",
                           "pixart-alpha/lora", prediction="epsilon", tokenizers=PIXART_T5, suggestions=2,
                           resolution=272, photos=2),
    "pixart_sigma": Family("pixart-sigma", "lora_unet_blocks_0_cross_attn_kv_linear", "pixart_sigma",
                           "pixart-sigma/lora", prediction="epsilon", tokenizers=PIXART_T5, suggestions=2,
                           resolution=272, photos=2, checkpointing=True),
    "hunyuan_dit": Family("hunyuan-dit", "lora_unet_blocks_0_attn2_kv_proj", "hunyuan_dit", "hunyuan-dit/lora",
                          prediction="v_prediction", tokenizers=("BertTokenizer(Fast)?", "_SentencePieceView"),
                          suggestions=0, photos=2),
    # v1.0: the same path; its fixture is 1408 wide (one block), the width the host tells it apart by
    "hunyuan_dit1": Family("hunyuan-dit", "lora_unet_blocks_0_attn2_kv_proj", "hunyuan_dit", "hunyuan-dit/lora",
                           prediction="v_prediction", tokenizers=("BertTokenizer(Fast)?", "_SentencePieceView"),
                           suggestions=0, photos=2),
}, ensure=fd.ensure_family, load=fd.load, host=host_eps, save_prefix="dit_")
name = SUITE.fixture()
# each block's attention, cross-attention and MLP Linears (no t_block / default_modulation / embedder / final layer)
BLOCK_LINEARS = {"pixart": ("attn_qkv", "attn_proj", "cross_attn_q_linear", "cross_attn_kv_linear", "cross_attn_proj",
                            "mlp_fc1", "mlp_fc2"),
                 "hunyuan": ("attn1_Wqkv", "attn1_out_proj", "attn2_q_proj", "attn2_kv_proj", "attn2_out_proj",
                             "mlp_fc1", "mlp_fc2")}


def test_predict_is_the_hosts_eps(comfy_host, pack, name):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    files, model, clip, vae = loaded = SUITE.load(name)
    backend = check_detected(pack, loaded, SUITE[name])
    schedule = backend.schedule()
    sigmas = model.get_model_object("model_sampling").sigmas.float()
    assert schedule.kind == "discrete" and len(schedule.alphas_cumprod) == 1000
    torch.testing.assert_close(schedule.alphas_cumprod, 1 / (1 + sigmas ** 2))
    assert model.model.diffusion_model.out_channels == 8  # learned σ: the host's forward returns the 4 ε/v ones

    x = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300, 800])
    size = (LATENT[0] * 8, LATENT[1] * 8)
    check_predict(backend, model, clip, host_eps, x, t, size)  # prompts of two text lengths: a forward each

    if name != "pixart_sigma":
        return
    # a node that re-patches its sampling to a continuous EDM schedule: refused up front, by the family's name
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    cb = comfy_backend(pack)
    with torch.inference_mode():
        edm = ModelSamplingContinuousEDM().patch(model, "eps", 120.0, 0.002)[0]
    with pytest.raises(core(pack, "backends.base").UnsupportedModel,
                       match=r"PixArtSigma MODEL samples with .*own discrete schedule"):
        cb.ComfyBackend(edm, clip, vae)
    # a MODEL whose options wrap apply_model: its raw output from the denoised one, ε and (behind the stock
    # ModelSamplingDiscrete node) v, equal to the direct path's (backend code, checked on one family)
    for sampling in ("eps", "v_prediction"):
        with torch.inference_mode():
            patched = ModelSamplingDiscrete().patch(model, sampling, False)[0]
        wrapped = patched.clone()
        wrapped.set_model_unet_function_wrapper(lambda f, a: f(a["input"], a["timestep"], **a["c"]))
        direct, through = cb.ComfyBackend(patched, clip, vae), cb.ComfyBackend(wrapped, clip, vae)
        assert direct.prediction_type == ("epsilon" if sampling == "eps" else "v_prediction")
        cond = direct.encode_text([PROMPT], size=size)
        with torch.no_grad():
            torch.testing.assert_close(through.predict(x[:1], t[:1], cond), direct.predict(x[:1], t[:1], cond),
                                       rtol=1e-3, atol=1e-3)


def test_lora_training_lowers_eps_loss_and_loads_in_the_stock_loader(comfy_host, pack, name, tmp_path, caplog):
    files = SUITE.load(name)[0]
    linears = BLOCK_LINEARS[name.split("_")[0]]
    blocks = {f"lora_unet_blocks_{i}_{n}" for i in range(files.layout["depth"]) for n in linears}
    check_lora_training(comfy_host, pack, SUITE, name, tmp_path, caplog, expect_targets=blocks,
                        probe_shape=(4, *LATENT), probe_at=600)


def test_class_images_are_the_stock_ksampler_images(comfy_host, pack, name):
    """A class image (512 x 16) is the PNG of a stock graph with that seed: CLIPTextEncode, an empty latent (4
    channels, as KSampler makes it of the 16-channel one), KSampler, VAEDecode."""
    files, model, clip, vae = SUITE.load(name)
    assert_class_image_is_stock(pack, model, clip, vae, width=LATENT[1] * 8, height=LATENT[0] * 8)
