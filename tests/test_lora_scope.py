"""LoRA target scope (`lora_targets`) and selective gradient checkpointing, on a tiny model.

`attention` must adapt exactly the attention projections diffusers' DreamBooth script adapts and
still give a LoRA file stock loaders read; checkpointing must change where memory goes, never a
number the model computes.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import diffusers_prediction, make_tiny_backend
from dreambooth_core import adapters
from dreambooth_core.cli.main import parser
from dreambooth_core.config import build_config
from dreambooth_core.config import ConfigError, TrainConfig
from dreambooth_core.adapters.kohya import select_lora_targets
from dreambooth_core.training.checkpoint import CheckpointMismatch
from dreambooth_core.training.trainer import train
from test_trainer import CLASS, INSTANCE, config, lora_state

UNET_ATTENTION = re.compile(r"^lora_unet_.*_attentions_\d+_transformer_blocks_\d+_attn[12]_to_(q|k|v|out_0)$")
TE_ATTENTION = re.compile(r"^lora_te_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj$")


def kohya_names(state: dict) -> set:
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}


def test_attention_scope_keeps_only_attention_projections():
    backend = make_tiny_backend()
    everything = backend.lora_targets(True, True)
    picked = select_lora_targets(everything, "attention")
    assert picked and all(UNET_ATTENTION.match(n) or TE_ATTENTION.match(n) for n in picked)
    # 4 transformer blocks (down, mid, 2 up) x 2 attentions x 4 projections + 1 CLIP layer x 4
    assert len(picked) == 4 * 2 * 4 + 4
    dropped = set(everything) - set(picked)
    for part in ("_proj_in", "_proj_out", "_ff_net_0_proj", "_ff_net_2", "_mlp_fc1", "_mlp_fc2"):
        assert any(n.endswith(part) for n in dropped), part
    assert select_lora_targets(everything, "transformer") == everything
    # LoCon's convolutions are not part of the transformer blocks: the scope leaves them alone
    with_conv = backend.lora_targets(True, False, conv=True)
    convs = {n for n in with_conv if "_resnets_" in n}
    assert convs and convs <= set(select_lora_targets(with_conv, "attention"))
    with pytest.raises(ValueError, match="'mlp'"):
        select_lora_targets(everything, "mlp")


def test_attention_lora_trains_saves_only_those_keys_and_loads_in_diffusers(tmp_path):
    pytest.importorskip("peft")
    ours = make_tiny_backend()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300])
    with torch.no_grad():
        before = ours.predict(x, t, ours.encode_text(["a photo of sks star"], size=(16, 16)))
    result = train(ours, config(tmp_path, steps=3, lora_targets="attention"), INSTANCE, CLASS)

    state, meta = adapters.read_lora_file(result.lora_path)
    names = kohya_names(state)
    assert names == set(result.network.adapters)
    assert all(UNET_ATTENTION.match(n) or TE_ATTENTION.match(n) for n in names)
    assert any(UNET_ATTENTION.match(n) for n in names) and any(TE_ATTENTION.match(n) for n in names)
    assert meta["dreambooth_lora_targets"] == "attention"

    theirs = diffusers_prediction(result.lora_path, x, t)
    with torch.no_grad():
        mine = ours.predict(x, t, ours.encode_text(["a photo of sks star"], size=(16, 16)))
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mine, before, atol=1e-4), "training must change the model's output"


def test_resume_refuses_another_target_scope(tmp_path):
    train(make_tiny_backend(), config(tmp_path, steps=2, checkpoint_every=1), INSTANCE, CLASS)
    with pytest.raises(CheckpointMismatch, match="lora_targets"):
        train(make_tiny_backend(), config(tmp_path, steps=4, lora_targets="attention", resume=True),
              INSTANCE, CLASS)


def _block_calls(backend) -> dict:
    """Forward calls per step of the UNet's transformer blocks and res-blocks (a checkpointed
    block runs twice: once in the forward pass, once again in the backward pass). Calls without
    gradients (the file's thumbnail sampled after training) are not steps' calls."""
    counts = {"BasicTransformerBlock": 0, "ResnetBlock2D": 0}
    for m in backend.unet.modules():
        kind = type(m).__name__
        if kind in counts:
            m.register_forward_pre_hook(lambda *_, kind=kind: counts.__setitem__(
                kind, counts[kind] + torch.is_grad_enabled()))
    return counts


@pytest.fixture(scope="module")
def unchecked(tmp_path_factory) -> tuple:
    """Block calls and LoRA of a 3-step run without checkpointing (shared by the scopes)."""
    backend = make_tiny_backend()
    calls = _block_calls(backend)
    result = train(backend, config(tmp_path_factory.mktemp("off"), steps=3), INSTANCE, CLASS)
    return calls, lora_state(result)


@pytest.mark.parametrize("scope", ["attention-hires", "attention", "full"])
def test_gradient_checkpointing_recomputes_its_scope_and_changes_no_weight(tmp_path, scope, unchecked):
    plain_calls, a = unchecked
    backend = make_tiny_backend()
    calls = _block_calls(backend)
    checkpointed = train(backend, config(tmp_path / scope, steps=3, gradient_checkpointing=scope), INSTANCE, CLASS)
    if scope == "attention-hires":  # the tiny UNet: 3 of its 4 transformer blocks are at the top level
        assert calls["BasicTransformerBlock"] == plain_calls["BasicTransformerBlock"] * 7 // 4, (calls, plain_calls)
    else:
        assert calls["BasicTransformerBlock"] == 2 * plain_calls["BasicTransformerBlock"], (calls, plain_calls)
    if scope != "full":  # the convolutions' blocks run once
        assert calls["ResnetBlock2D"] == plain_calls["ResnetBlock2D"], (calls, plain_calls)
    else:  # diffusers checkpoints most res-blocks too (not every one: e.g. the mid block's first)
        assert calls["ResnetBlock2D"] > plain_calls["ResnetBlock2D"], (calls, plain_calls)
    assert not backend.unet.is_gradient_checkpointing, "the run must switch it off again"
    b = lora_state(checkpointed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_checkpointing_setting_keeps_the_boolean_meaning():
    assert TrainConfig(gradient_checkpointing=True).gradient_checkpointing == "full"
    assert TrainConfig(gradient_checkpointing=False).gradient_checkpointing == "off"
    assert TrainConfig.from_mapping({"gradient-checkpointing": "attention"}).gradient_checkpointing == "attention"
    with pytest.raises(ConfigError, match="gradient_checkpointing.*'some'"):
        TrainConfig(class_noun="star", gradient_checkpointing="some").validate()
    with pytest.raises(ConfigError, match="lora_targets.*'all'"):
        TrainConfig(class_noun="star", lora_targets="all").validate()


@pytest.mark.parametrize("flags, scope", [([], "off"), (["--gradient-checkpointing"], "full"),
                                          (["--gradient-checkpointing", "attention"], "attention"),
                                          (["--no-gradient-checkpointing"], "off")])
def test_cli_flags(flags, scope):
    c = build_config(parser().parse_args(["train", "--class-noun", "star", "--lora-targets", "attention", *flags]))
    assert c.gradient_checkpointing == scope and c.lora_targets == "attention"


@pytest.mark.parametrize("family, prediction, version, v2", [
    ("sd1", "epsilon", "sd_v1", "False"),
    ("sd2", "v_prediction", "sd_v2", "True"),
    ("sdxl", "epsilon", "sdxl_base_v1-0", "False"),
])
def test_the_file_names_its_base_family_as_the_webui_and_model_spec_read_it(family, prediction, version, v2):
    """The WebUI's LoRA cards file a LoRA under SD1 / SD2 / SDXL by `ss_base_model_version` and `ss_v2`
    (and hide it under checkpoints of another family); without them every file counted as SD1."""
    from types import SimpleNamespace

    from dreambooth_core.adapters.metadata import lora_metadata

    backend = SimpleNamespace(family=family, prediction_type=prediction, describe=lambda: "m", native_resolution=512,
                              base_fingerprint=lambda: "f")
    meta = lora_metadata(TrainConfig(class_noun="dog", save_name="rex", lora_conv=True, rank=8, alpha=4.0),
                         backend, steps=10)
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == (version, v2)
    assert meta["ss_v_parameterization"] == str(prediction == "v_prediction")
    assert meta["modelspec.architecture"].endswith("/lora") and meta["modelspec.trigger_phrase"] == "sks dog"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "4"}


def test_a_trained_sd1_lora_says_sd1():
    from dreambooth_core.adapters.metadata import lora_metadata

    meta = lora_metadata(TrainConfig(class_noun="dog"), make_tiny_backend(), steps=1)
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False") and "ss_network_args" not in meta


def test_attention_scope_keeps_the_attention_projections_of_the_flow_transformers():
    """Flux/Chroma, SD3 and Lumina 2 name their blocks differently from the UNet: "attention" keeps their
    (fused) attention projections and drops their MLPs, instead of keeping everything."""
    names = {
        "lora_unet_double_blocks_0_img_attn_qkv": True, "lora_unet_double_blocks_0_txt_attn_proj": True,
        "lora_unet_double_blocks_0_img_mlp_0": False, "lora_unet_double_blocks_0_txt_mlp_2": False,
        "lora_unet_single_blocks_3_linear1": True, "lora_unet_single_blocks_3_linear2": True,
        "lora_unet_joint_blocks_1_x_block_attn_qkv": True, "lora_unet_joint_blocks_0_x_block_attn2_proj": True,
        "lora_unet_joint_blocks_1_context_block_mlp_fc1": False,
        "lora_unet_layers_0_attention_qkv": True, "lora_unet_noise_refiner_1_attention_out": True,
        "lora_unet_layers_0_feed_forward_w2": False, "lora_unet_context_refiner_0_feed_forward_w1": False,
    }
    picked = select_lora_targets({n: torch.nn.Linear(2, 2) for n in names}, "attention")
    assert set(picked) == {n for n, keep in names.items() if keep}


def test_flux_block_targets_are_the_blocks_attention_and_mlp_linears_by_kohya_name():
    """The Flux / Chroma LoRA Linears (kohya.FLUX_BLOCK_LINEARS, shared by every host): attention and MLP
    of both block kinds, never the modulation Linears or anything outside the blocks."""
    from torch import nn

    from dreambooth_core.adapters.kohya import FLUX_BLOCK_LINEARS, block_lora_targets

    def block(double):
        if double:
            parts = {f"{s}_{k}": nn.Module() for s in ("img", "txt") for k in ("attn", "mod")}
            for s in ("img", "txt"):
                parts[f"{s}_attn"].qkv, parts[f"{s}_attn"].proj = nn.Linear(4, 12), nn.Linear(4, 4)
                parts[f"{s}_mod"].lin = nn.Linear(4, 24)
                parts[f"{s}_mlp"] = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
            return nn.ModuleDict(parts)
        return nn.ModuleDict({"linear1": nn.Linear(4, 20), "linear2": nn.Linear(12, 4),
                              "modulation": nn.ModuleDict({"lin": nn.Linear(4, 12)})})

    dm = nn.Module()
    dm.img_in, dm.double_blocks, dm.single_blocks = nn.Linear(64, 4), nn.ModuleList([block(True)]), \
        nn.ModuleList([block(False), block(False)])
    names = set(block_lora_targets(dm, FLUX_BLOCK_LINEARS))
    assert names == {f"lora_unet_double_blocks_0_{s}_{k}" for s in ("img", "txt")
                     for k in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2")} | \
        {f"lora_unet_single_blocks_{i}_linear{j}" for i in (0, 1) for j in (1, 2)}


def test_sd3_block_targets_are_the_joint_blocks_attention_and_mlp_linears_by_kohya_name():
    """The SD3 / SD3.5 LoRA Linears (kohya.SD3_BLOCK_LINEARS, shared by every host): attention (medium's attn2
    too) and MLP of both streams, never the adaLN modulation, the q/k norms or anything outside the blocks."""
    from torch import nn

    from dreambooth_core.adapters.kohya import SD3_BLOCK_LINEARS, block_lora_targets

    def stream(second_attention):
        parts = {"attn": nn.ModuleDict({"qkv": nn.Linear(4, 12), "proj": nn.Linear(4, 4), "ln_q": nn.LayerNorm(2)}),
                 "mlp": nn.ModuleDict({"fc1": nn.Linear(4, 8), "fc2": nn.Linear(8, 4)}),
                 "adaLN_modulation": nn.Sequential(nn.SiLU(), nn.Linear(4, 24))}
        if second_attention:
            parts["attn2"] = nn.ModuleDict({"qkv": nn.Linear(4, 12), "proj": nn.Linear(4, 4)})
        return nn.ModuleDict(parts)

    dm = nn.Module()
    dm.context_embedder, dm.final_layer = nn.Linear(8, 4), nn.ModuleDict({"linear": nn.Linear(4, 4)})
    dm.joint_blocks = nn.ModuleList([nn.ModuleDict({"context_block": stream(False), "x_block": stream(True)})])
    names = set(block_lora_targets(dm, SD3_BLOCK_LINEARS))
    assert names == {f"lora_unet_joint_blocks_0_{s}_block_{k}" for s in ("context", "x")
                     for k in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2")} | \
        {"lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_joint_blocks_0_x_block_attn2_proj"}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_every_locon_name_is_one_the_webui_puts_on_that_convolution(arch):
    """The Automatic1111 WebUI maps `up_blocks_{b}_upsamplers_0_conv` to module 1 of its output
    block for b = 0 and module 2 otherwise (SD1's first up block has no attention). SDXL's first up
    block has attentions: its upsampler is module 2, so that name would miss. Such a name must not
    reach the file; SD1's keeps its first upsampler."""
    from diffusers import UNet2DConditionModel

    from dreambooth_core.adapters.kohya import is_unet_target, kohya_name
    from fixtures_ldm import REDUCED

    config = REDUCED[arch]["unet"]
    unet = UNet2DConditionModel(**config)
    targets = {kohya_name("lora_unet", path): m for path, m in unet.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and is_unet_target(path, conv=True)}
    kept = select_lora_targets(targets, "transformer")
    upsamplers = {b: f"lora_unet_up_blocks_{b}_upsamplers_0_conv" for b in range(len(config["up_block_types"]) - 1)}
    assert all(name in targets for name in upsamplers.values())
    for b, name in upsamplers.items():
        ldm_index = 2 if "CrossAttn" in config["up_block_types"][b] else 1
        webui_index = 1 if b == 0 else 2
        assert (name in kept) == (ldm_index == webui_index), (arch, name)
    assert set(targets) - set(kept) == ({upsamplers[0]} if arch == "sdxl" else set())
