"""Single-file checkpoints: detection from the header, every error case, and real loads.

Fast tests (CPU, seeded, no network): detection on files that hold only the keys detection
reads; each error; full ldm-layout round trips of REDUCED SD1/SD2/SDXL models (real key layout,
tiny widths, passed as config_dir) compared exactly with the diffusers models they came from; and
checks of the shipped full-size configs against the real layout, on the meta device.
Slow tests (RUN_SLOW=1): full-size SD1.5, SD2.1 (768 v) and SDXL files with seeded fp16 weights,
loaded with the shipped configs.
"""
from __future__ import annotations

import gc
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_ldm as F  # noqa: E402

from dreambooth_core.backends.single_file import (
    CONFIGS_DIR,
    CheckpointError,
    CheckpointInfo,
    detect_checkpoint,
    load_single_file,
)

slow = pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="full-size model; set RUN_SLOW=1")


_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models: one thread is as fast, and does not spin against other jobs on a shared CPU
    (the full-size tests keep all threads)."""
    torch.set_num_threads(_THREADS if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(_THREADS)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach a hub fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _probe(std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(320, generator=g) * std).to(torch.float16)


# --------------------------------------------------------------------------------------------
# detection


def test_detect_sd1(tmp_path):
    f = F.shape_file(tmp_path / "sd15.safetensors", F.detection_shapes("sd1"))
    assert detect_checkpoint(f) == CheckpointInfo("sd1", "epsilon", 512, "sd1")
    assert detect_checkpoint(str(f), prediction_type="v_prediction") == CheckpointInfo(
        "sd1", "v_prediction", 512, "sd1")


@pytest.mark.parametrize("std, expected", [(0.2, CheckpointInfo("sd2", "v_prediction", 768, "sd2-v")),
                                           (0.01, CheckpointInfo("sd2", "epsilon", 512, "sd2-base"))])
def test_detect_sd2_by_heuristic(tmp_path, std, expected):
    f = F.shape_file(tmp_path / "sd21.safetensors", F.detection_shapes("sd2"), {F.SD2_V_PROBE: _probe(std)})
    assert detect_checkpoint(f) == expected


def test_detect_sd2_override_and_missing_probe(tmp_path):
    v = F.shape_file(tmp_path / "v.safetensors", F.detection_shapes("sd2"), {F.SD2_V_PROBE: _probe(0.2)})
    eps = F.shape_file(tmp_path / "eps.safetensors", F.detection_shapes("sd2"), {F.SD2_V_PROBE: _probe(0.01)})
    bare = F.shape_file(tmp_path / "bare.safetensors", F.detection_shapes("sd2"))
    assert detect_checkpoint(v, prediction_type="epsilon") == CheckpointInfo("sd2", "epsilon", 512, "sd2-base")
    assert detect_checkpoint(eps, prediction_type="v_prediction") == CheckpointInfo("sd2", "v_prediction", 768, "sd2-v")
    assert detect_checkpoint(eps, prediction_type="v").prediction_type == "v_prediction"  # alias
    assert detect_checkpoint(bare).config_name == "sd2-base"  # no probe tensor: epsilon, as ComfyUI
    with pytest.raises(ValueError, match="prediction_type"):
        detect_checkpoint(eps, prediction_type="flow")


def test_detect_sdxl_and_vpred_markers(tmp_path):
    f = F.shape_file(tmp_path / "sdxl.safetensors", F.detection_shapes("sdxl"))
    assert detect_checkpoint(f) == CheckpointInfo("sdxl", "epsilon", 1024, "sdxl")
    vpred = F.shape_file(tmp_path / "noob-v.safetensors", {**F.detection_shapes("sdxl"), "v_pred": (0,), "ztsnr": (0,)})
    assert detect_checkpoint(vpred) == CheckpointInfo("sdxl", "v_prediction", 1024, "sdxl", zero_terminal_snr=True)
    assert detect_checkpoint(vpred, prediction_type="epsilon").prediction_type == "epsilon"


def test_detection_reads_only_the_header(tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    reads = []
    real_open = safetensors.safe_open

    class CountingOpen:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            reads.append(key)
            return self.f.get_tensor(key)

    def forbidden(*a, **k):
        raise AssertionError("detection loaded the whole file")

    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    monkeypatch.setattr(safetensors.torch, "load", forbidden)
    monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
    for arch in ("sd1", "sdxl"):
        detect_checkpoint(F.shape_file(tmp_path / f"{arch}.safetensors", F.detection_shapes(arch)))
    assert reads == []
    sd2 = F.shape_file(tmp_path / "sd2.safetensors", F.detection_shapes("sd2"), {F.SD2_V_PROBE: _probe(.2)})
    detect_checkpoint(sd2)
    assert reads == [F.SD2_V_PROBE]


# --------------------------------------------------------------------------------------------
# errors


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as e:
        detect_checkpoint(path, **kwargs)
    assert str(path) in str(e.value)
    return str(e.value)


def test_missing_file_and_folders(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.safetensors")
    assert "folder" in _error(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    assert "diffusers model folder" in _error(tmp_path)


def test_pickle_files_are_refused(tmp_path):
    ckpt = tmp_path / "v1-5-pruned.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, ckpt)
    msg = _error(ckpt)
    assert "pickle" in msg and "only .safetensors" in msg.lower() and "Save Checkpoint" in msg
    assert "weights_only=True" in msg and "v1-5-pruned.safetensors" in msg
    for suffix in (".pt", ".bin", ".pth"):
        p = tmp_path / f"model{suffix}"
        p.write_bytes(b"whatever")
        assert "pickle" in _error(p)
    disguised = tmp_path / "disguised.safetensors"
    torch.save({"a": torch.zeros(1)}, disguised)  # a zip pickle under a safetensors name
    assert "pickle" in _error(disguised)


def test_invalid_safetensors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 8)
    assert "not a valid safetensors" in _error(garbage)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    assert "not a valid safetensors" in _error(short)
    good = F.shape_file(tmp_path / "good.safetensors", F.detection_shapes("sd1"))
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(data[: 8 + n // 2])
    assert "not a valid safetensors" in _error(cut_header)
    cut_data = tmp_path / "cut_data.safetensors"
    cut_data.write_bytes(data[: 8 + n + 100])
    assert "truncated" in _error(cut_data)
    bad_json = tmp_path / "bad_json.safetensors"
    bad_json.write_bytes((10).to_bytes(8, "little") + b"{not json}")
    assert "not valid JSON" in _error(bad_json)


@pytest.mark.parametrize("name, shapes, expected", [
    ("lora", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4),
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}, "LoRA"),
    ("peft_lora", {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320)}, "LoRA"),
    ("vae", {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3),
             "quant_conv.weight": (8, 8, 1, 1)}, "VAE-only"),
    ("sd3", {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,)},
     "Stable Diffusion 3"),
    ("flux", {"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "Flux"),
    ("unet_only", {"input_blocks.0.0.weight": (320, 4, 3, 3)}, "only a UNet"),
    ("embedding", {"emb_params": (2, 768)}, "textual-inversion"),
    ("other", {"foo.bar": (3,)}, "not a Stable Diffusion checkpoint layout"),
])
def test_unsupported_files(tmp_path, name, shapes, expected):
    msg = _error(F.shape_file(tmp_path / f"{name}.safetensors", shapes))
    assert expected in msg and "Supported are" in msg and "SDXL" in msg


def test_unsupported_sd_variants(tmp_path):
    inpaint = {**F.detection_shapes("sd1"), F.UNET + "input_blocks.0.0.weight": (320, 9, 3, 3)}
    assert "inpainting" in _error(F.shape_file(tmp_path / "inpaint.safetensors", inpaint))
    refiner = {F.UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280),
               "conditioner.embedders.0.model.ln_final.bias": (1280,), F.VAE + "quant_conv.weight": (8, 8, 1, 1)}
    assert "refiner" in _error(F.shape_file(tmp_path / "refiner.safetensors", refiner))
    no_te = {k: v for k, v in F.detection_shapes("sd1").items() if not k.startswith("cond_stage_model")}
    assert "no text encoder" in _error(F.shape_file(tmp_path / "no_te.safetensors", no_te))
    no_vae = {k: v for k, v in F.detection_shapes("sd1").items() if not k.startswith(F.VAE)}
    assert "no VAE" in _error(F.shape_file(tmp_path / "no_vae.safetensors", no_vae))


def test_tensors_that_do_not_match_the_detected_architecture(tmp_path):
    # SD1 text encoder with an SD2-width UNet: caught from the header
    mixed = {**F.detection_shapes("sd1"),
             F.UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
    msg = _error(F.shape_file(tmp_path / "mixed.safetensors", mixed))
    assert "do not match" in msg and "768" in msg and "1024" in msg and "config_dir" in msg


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """Reduced SD1/SD2/SDXL models (seeded), their config folders and ldm-layout files."""
    tmp = tmp_path_factory.mktemp("reduced")
    out = {}
    for arch in ("sd1", "sd2", "sdxl"):
        models, config_dir, ldm = F.reduced_checkpoint(tmp, arch, seed=1)
        out[arch] = dict(models=models, config_dir=config_dir, ldm=ldm,
                         path=F.save(tmp / f"mini-{arch}.safetensors", ldm))
    return out


def test_diffusers_errors_are_surfaced_with_the_file_name(tmp_path, reduced, no_network):
    r = reduced["sd1"]
    # the reduced file with the shipped full-size sd1 config: widths do not match SD1 (header check)
    msg = _error(r["path"])
    assert "do not match" in msg
    # the right family but a different (wider) config: diffusers' converter refuses the tensors
    other = F.write_config_dir(tmp_path / "other", "sd1", r["models"])
    cfg = json.loads((other / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [48, 64, 64]
    (other / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_single_file(r["path"], config_dir=other)
    assert str(r["path"]) in str(e.value) and "diffusers said" in str(e.value) and "expected shape" in str(e.value)


def test_incomplete_file_is_named(tmp_path, reduced, no_network):
    r = reduced["sd1"]
    # a few tensors missing: diffusers would leave them uninitialised (on the meta device)
    pruned = {k: v for k, v in r["ldm"].items() if ".output_blocks.4.1.transformer_blocks.0.attn1." not in k}
    path = F.save(tmp_path / "pruned.safetensors", pruned)
    with pytest.raises(CheckpointError) as e:
        load_single_file(path, config_dir=r["config_dir"])
    msg = str(e.value)
    assert str(path) in msg and "lacks 5 unet tensors" in msg
    assert "up_blocks.1.attentions.1.transformer_blocks.0.attn1" in msg
    # a text-encoder tensor missing
    pruned = {k: v for k, v in r["ldm"].items() if "final_layer_norm" not in k}
    path = F.save(tmp_path / "pruned-te.safetensors", pruned)
    with pytest.raises(CheckpointError, match="lacks 2 text_encoder tensors"):
        load_single_file(path, config_dir=r["config_dir"])
    # a whole block missing: diffusers' converter itself fails
    pruned = {k: v for k, v in r["ldm"].items() if ".output_blocks.5." not in k}
    path = F.save(tmp_path / "pruned-more.safetensors", pruned)
    with pytest.raises(CheckpointError) as e:
        load_single_file(path, config_dir=r["config_dir"])
    assert str(path) in str(e.value) and "diffusers said" in str(e.value)


def test_safetensors_with_another_suffix(tmp_path, reduced):
    path = F.save(tmp_path / "model.sft", reduced["sd1"]["ldm"])
    assert detect_checkpoint(path, config_dir=reduced["sd1"]["config_dir"]).arch == "sd1"
    with pytest.raises(CheckpointError, match="rename it to model.safetensors"):
        load_single_file(path, config_dir=reduced["sd1"]["config_dir"])


# --------------------------------------------------------------------------------------------
# loading: reduced models in the real layout, compared exactly with their diffusers source


def _assert_same_weights(models, pipe):
    for name, ref in models.items():
        got = getattr(pipe, name).state_dict()
        want = ref.state_dict()
        assert set(got) == set(want), name
        for k, v in want.items():
            assert torch.equal(got[k], v), f"{name}.{k}"


def _close(a, b):
    # The weights are bit-identical (_assert_same_weights); outputs may still differ in the last bits,
    # because the CPU kernels take other SIMD paths for tensors that sit at other memory alignments
    # (tensors read from a file vs freshly allocated ones). Cloning the loaded weights makes them equal.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert a.abs().sum() > 0


@torch.no_grad()
def _assert_same_outputs(arch, models, pipe):
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    te = pipe.text_encoder(ids, output_hidden_states=True)
    te_ref = models["text_encoder"](ids, output_hidden_states=True)
    _close(te.last_hidden_state, te_ref.last_hidden_state)
    context = te.last_hidden_state
    added = None
    if arch == "sdxl":
        ids2 = pipe.tokenizer_2(["a photo of sks dog"], padding="max_length", max_length=77,
                                return_tensors="pt").input_ids
        te2, te2_ref = pipe.text_encoder_2(ids2, output_hidden_states=True), models["text_encoder_2"](
            ids2, output_hidden_states=True)
        _close(te2.text_embeds, te2_ref.text_embeds)
        context = torch.cat([te.hidden_states[-2], te2.hidden_states[-2]], dim=-1)
        added = {"text_embeds": te2.text_embeds, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    latents = torch.randn(1, 4, 8, 8, generator=g)
    out = pipe.unet(latents, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample
    ref = models["unet"](latents, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample
    _close(out, ref)
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    _close(pipe.vae.encode(image).latent_dist.mean, models["vae"].encode(image).latent_dist.mean)
    _close(pipe.vae.decode(latents).sample, models["vae"].decode(latents).sample)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_load_reduced_checkpoint_exactly(arch, reduced, no_network):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    r = reduced[arch]
    pipe, info = load_single_file(r["path"], config_dir=r["config_dir"])
    assert info.arch == arch and info.prediction_type == "epsilon" and info.config_name == str(r["config_dir"])
    assert isinstance(pipe, StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline)
    _assert_same_weights(r["models"], pipe)
    _assert_same_outputs(arch, r["models"], pipe)
    assert pipe.tokenizer.pad_token == ("!" if arch == "sd2" else "<|endoftext|>")
    if arch == "sdxl":
        assert pipe.tokenizer_2.pad_token == "!"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert getattr(pipe, "safety_checker", None) is None


def test_loaded_pipeline_samples(reduced, no_network):
    for arch in ("sd1", "sdxl"):
        r = reduced[arch]
        pipe, _ = load_single_file(r["path"], config_dir=r["config_dir"])
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a photo of sks dog", num_inference_steps=2, height=16, width=16, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (1, 16, 16, 3)


def test_prediction_type_reaches_the_scheduler(tmp_path, reduced, no_network):
    r = reduced["sd2"]
    pipe, info = load_single_file(r["path"], prediction_type="v_prediction", config_dir=r["config_dir"])
    assert info.prediction_type == "v_prediction" and pipe.scheduler.config.prediction_type == "v_prediction"
    x = reduced["sdxl"]
    marked = F.save(tmp_path / "xl-vpred.safetensors", {**x["ldm"], "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)})
    pipe, info = load_single_file(marked, config_dir=x["config_dir"])
    assert info.prediction_type == "v_prediction" and info.zero_terminal_snr
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    assert pipe.scheduler.alphas_cumprod[-1] < 1e-6


def test_text_encoder_without_text_model_level(tmp_path, reduced, no_network):
    """Some SD1 merges store 'cond_stage_model.transformer.embeddings.…' (no 'text_model.'); ComfyUI reads them."""
    r = reduced["sd1"]
    flat = {k.replace(F.SD1_TE + "text_model.", F.SD1_TE): v for k, v in r["ldm"].items()}
    path = F.save(tmp_path / "flat-te.safetensors", flat)
    pipe, _ = load_single_file(path, config_dir=r["config_dir"])
    _assert_same_weights(r["models"], pipe)


def test_torch_dtype(reduced, no_network):
    r = reduced["sd1"]
    pipe, _ = load_single_file(r["path"], torch_dtype=torch.float16, config_dir=r["config_dir"])
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float16}


# --------------------------------------------------------------------------------------------
# the shipped full-size configs against the real layout (meta device: no weights, milliseconds)

# parameter counts of the official models (UNet, VAE, text encoder[, text encoder 2])
OFFICIAL_PARAMS = {"sd1": (859_520_964, 83_653_863, 123_060_480),
                   "sd2-base": (865_910_724, 83_653_863, 340_387_840),
                   "sd2-v": (865_910_724, 83_653_863, 340_387_840),
                   "sdxl": (2_567_463_684, 83_653_863, 123_060_480, 694_659_840)}
# names and shapes of tensors as they appear in the original single-file releases
REAL_KEYS = {
    "sd1": {F.UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            F.UNET + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            F.UNET + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
            F.UNET + "middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
            F.UNET + "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
            F.UNET + "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
            F.UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias": (320,),
            F.UNET + "time_embed.0.weight": (1280, 320), F.UNET + "out.2.weight": (4, 320, 3, 3),
            F.VAE + "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            F.VAE + "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
            F.VAE + "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
            F.VAE + "quant_conv.weight": (8, 8, 1, 1),
            F.SD1_TE + "text_model.embeddings.token_embedding.weight": (49408, 768),
            F.SD1_TE + "text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072)},
    "sd2": {F.UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            F.UNET + "input_blocks.1.1.proj_in.weight": (320, 320),
            F.SD2_TE + "positional_embedding": (77, 1024),
            F.SD2_TE + "transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
            F.SD2_TE + "transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
            F.SD2_TE + "text_projection": (1024, 1024)},
    "sdxl": {F.UNET + "label_emb.0.0.weight": (1280, 2816),
             F.UNET + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
             F.UNET + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
             F.UNET + "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
             F.UNET + "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             F.UNET + "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
             F.SDXL_TE1 + "text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
             F.SDXL_TE2 + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
             F.SDXL_TE2 + "text_projection": (1280, 1280)},
}


def _meta_models(name):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = str(CONFIGS_DIR / name)
    with init_empty_weights():
        models = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet")),
                  "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
                  "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))}
        if name == "sdxl":
            models["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
    return models


@pytest.mark.parametrize("name", ["sd1", "sd2-base", "sd2-v", "sdxl"])
def test_shipped_configs_describe_the_real_layout(name, tmp_path):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    arch = name.split("-")[0]
    models = _meta_models(name)
    counts = tuple(sum(p.numel() for p in m.parameters()) for m in models.values())
    assert counts == OFFICIAL_PARAMS[name]
    sds = {k: m.state_dict() for k, m in models.items()}
    configs = {k: dict(models[k].config) for k in ("unet", "vae")}
    ldm = F.to_ldm(arch, sds, configs)  # for SD2 with the unused 24th text-encoder layer, as real files have
    for key, shape in REAL_KEYS[arch].items():
        assert tuple(ldm[key].shape) == shape, key
    # diffusers' own converter maps the real layout back onto exactly the shipped architecture
    back = {"unet": convert_ldm_unet_checkpoint(ldm, configs["unet"]),
            "vae": convert_ldm_vae_checkpoint(ldm, configs["vae"])}
    if arch == "sd1":
        back["text_encoder"] = convert_ldm_clip_checkpoint(ldm)
    elif arch == "sd2":
        back["text_encoder"] = convert_open_clip_checkpoint(models["text_encoder"], ldm, prefix=F.SD2_TE)
    else:
        back["text_encoder"] = convert_ldm_clip_checkpoint(ldm)
        back["text_encoder_2"] = convert_open_clip_checkpoint(models["text_encoder_2"], ldm, prefix=F.SDXL_TE2)
    for comp, model in models.items():
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k.removeprefix("text_model.") if comp == "text_encoder" else k: tuple(v.shape)
               for k, v in back[comp].items() if not k.endswith("position_ids")}
        if comp == "text_encoder" and arch == "sd2":
            got = {k: s for k, s in got.items() if ".layers.23." not in k}
        assert got == want, comp
    # and detection, on the real names/shapes of the keys it reads, picks this config
    def smallest(prefix):
        return min((k for k in ldm if k.startswith(prefix)), key=lambda k: ldm[k].numel())

    keys = [k for k in ldm if k.endswith(".attn2.to_k.weight")][:1] + [
        smallest(F.VAE), F.UNET + "input_blocks.0.0.weight"] + [
        smallest(p) for p in (F.SD1_TE, F.SD2_TE, F.SDXL_TE1, F.SDXL_TE2) if any(k.startswith(p) for k in ldm)]
    shapes = {k: ldm[k].shape for k in keys}
    if arch == "sdxl":
        shapes[F.UNET + "label_emb.0.0.weight"] = (1, 1)  # only its presence is read
    f = F.shape_file(tmp_path / "probe.safetensors", shapes)
    prediction = "v_prediction" if name == "sd2-v" else None
    info = detect_checkpoint(f, prediction_type=prediction)
    assert (info.arch, info.config_name) == (arch, name)
    with open(CONFIGS_DIR / name / "vae" / "config.json") as fh:
        assert json.load(fh)["sample_size"] == info.native_resolution


# --------------------------------------------------------------------------------------------
# full-size files (slow): seeded fp16 weights in the original layout, loaded with the shipped configs


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@slow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd1", "sd2-v", "sdxl"])
def test_full_size_checkpoint_loads_with_shipped_config(name, tmp_path, no_network):
    arch = name.split("-")[0]
    t0 = time.perf_counter()
    models = _meta_models(name)
    configs = {k: dict(models[k].config) for k in ("unet", "vae")}
    sds = {k: F.seeded_state_dict(m, dtype=torch.float16) for k, m in models.items()}
    overrides = {}
    if name == "sd2-v":  # a v-model: the heuristic's tensor has std > 0.09
        key = "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"
        overrides[key] = sds["unet"][key] = F.seeded_tensor(key, (320,), torch.float16, scale=0.2)
    path = F.save(tmp_path / f"full-{name}.safetensors", F.to_ldm(arch, sds, configs))
    del sds
    gc.collect()
    t1 = time.perf_counter()
    pipe, info = load_single_file(path, torch_dtype=torch.float16)
    t2 = time.perf_counter()
    assert info.config_name == name and info.arch == arch
    for comp, model in models.items():
        got = getattr(pipe, comp).state_dict()
        want_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in got.items()} == want_shapes, comp
        for k, shape in want_shapes.items():
            want = overrides.get(k) if comp == "unet" and k in overrides else F.seeded_tensor(k, shape, torch.float16)
            assert torch.equal(got[k], want), f"{comp}.{k}"
    t3 = time.perf_counter()
    print(f"\n{name}: file {path.stat().st_size / 2**30:.2f} GiB; write {t1 - t0:.0f}s, load_single_file "
          f"{t2 - t1:.0f}s, compare {t3 - t2:.0f}s; peak RSS {_peak_rss_gb():.1f} GiB")
