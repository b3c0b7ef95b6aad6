"""The ldm → diffusers LoRA names (dreambooth_core.adapters.kohya, used by the WebUI backend) must invert the test fixtures' own
diffusers → ldm layout (written independently, from the original repositories' key layout), for
SD1.5's block structure and for the reduced one the WebUI tests use. Same names ⇒ the LoRA file
is the one the ComfyUI nodes and the standalone backend write."""
from __future__ import annotations

import pytest

from dreambooth_core.adapters.kohya import unet_diffusers_path
from fixtures_ldm import UNET, unet_to_ldm


SD15 = dict(layers_per_block=2, block_out_channels=(32, 32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
MINI = dict(layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)


@pytest.mark.parametrize("layout", [SD15, MINI], ids=["sd15", "mini"])
def test_ldm_paths_map_back_to_the_diffusers_names(layout):
    from diffusers import UNet2DConditionModel

    config = dict(layout, sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=8)
    sd = UNet2DConditionModel(**config).state_dict()
    per = config["layers_per_block"] + 1
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    checked = 0
    for key, tensor in sd.items():
        if not key.endswith(".weight") or tensor.ndim < 2:  # Linear / Conv weights only
            continue
        ldm = next(iter(unet_to_ldm({key: tensor}, config)))[len(UNET):-len(".weight")]
        parts = ldm.split(".")
        # an output block's sub-module 1 is a transformer on a cross-attention level, else the upsampler
        attention = parts[0] == "output_blocks" and parts[2] == "1" and up_attn[int(parts[1]) // per]
        expected = None if key.startswith(("conv_in", "conv_out", "time_embedding")) else key[:-len(".weight")]
        assert unet_diffusers_path(ldm, per, attention) == expected, (key, ldm)
        checked += expected is not None
    assert checked > 20
