"""tools/pretrain_toy_model.py can start a UNet of another layout on the shipped text encoder: the
way to a toy model whose every block hears the prompt (README, Quality evaluation)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreambooth_core.embedded import model as embedded

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "pretrain_toy_model.py"

pytestmark = pytest.mark.skipif(not (embedded.EMBEDDED_MODEL_DIR / "model_index.json").is_file(),
                                reason="embedded model not built")


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "--threads", "2", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=600)


def import_tool():
    """The tool as a module, for its helpers (it lives outside the package)."""
    sys.path.insert(0, str(TOOL.parent))
    try:
        import pretrain_toy_model
    finally:
        sys.path.remove(str(TOOL.parent))
    return pretrain_toy_model


def weights(folder: Path, part: str) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted((folder / part).glob("*.safetensors")) for k, v in load_file(f).items()}


def test_a_new_unet_layout_trains_on_the_shipped_text_encoder(tmp_path):
    tool = import_tool()
    work, out = tmp_path / "work", tmp_path / "model"
    done = run_tool("--work", str(work), "--out", str(out), "--steps", "2", "--save-every", "1",
                    "--probe-every", "1000", "--lr", "0.4", "--cross-attention", "16,8",
                    "--text-encoder-from", str(embedded.EMBEDDED_MODEL_DIR))
    assert done.returncode == 0, done.stderr[-2000:]

    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert config["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert tool.exported_cross_attention(out) == (16, 8)
    assert tool.exported_cross_attention(embedded.EMBEDDED_MODEL_DIR) == (8,)

    # the text encoder is the shipped one, unchanged; the UNet trained away from its initialisation
    shipped, new = weights(embedded.EMBEDDED_MODEL_DIR, "text_encoder"), weights(out, "text_encoder")
    assert shipped.keys() == new.keys() and all(torch.equal(shipped[k], new[k]) for k in shipped)
    _, unet, _, _ = tool.build_models(0, (16, 8))
    init = {k: v.half() for k, v in unet.state_dict().items()}
    trained = weights(out, "unet")
    assert init.keys() == trained.keys()
    assert max((init[k].float() - trained[k].float()).abs().max().item() for k in init) > 1e-3
    log = json.loads((out / "pretraining_log.json").read_text())
    assert log[0]["text_encoder_from"] == str(embedded.EMBEDDED_MODEL_DIR)

    # its checkpoint resumes only with the same layout
    refused = run_tool("--work", str(work), "--out", str(tmp_path / "other"), "--steps", "3",
                       "--cross-attention", "8")
    assert refused.returncode != 0 and "cross-attention at 16,8" in refused.stderr, refused.stderr[-2000:]


def test_attention_heads_per_level_are_built_exported_and_kept_when_continued(tmp_path):
    tool = import_tool()
    with pytest.raises(SystemExit, match="each dividing"):
        tool.unet_config((32, 16, 8), (3, 8, 8))
    with pytest.raises(SystemExit, match="one count per UNet level"):
        tool.unet_config((32, 16, 8), (1, 8))
    assert tool.unet_config((8,)) == dict(embedded.UNET_CONFIG, down_block_types=("DownBlock2D", "DownBlock2D",
                                          "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D",
                                          "UpBlock2D", "UpBlock2D"))  # the shipped layout, unchanged

    out = tmp_path / "model"
    done = run_tool("--work", str(tmp_path / "work"), "--out", str(out), "--steps", "0",  # the layout, untrained
                    "--cross-attention", "32,16,8", "--attention-heads", "1,8,8",
                    "--text-encoder-from", str(embedded.EMBEDDED_MODEL_DIR))
    assert done.returncode == 0, done.stderr[-2000:]
    assert tool.exported_attention_heads(out) == (1, 8, 8)
    assert tool.exported_attention_heads(embedded.EMBEDDED_MODEL_DIR) == (8, 8, 8)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 1
    assert unet.down_blocks[2].attentions[0].transformer_blocks[0].attn1.heads == 8

    refused = run_tool("--work", str(tmp_path / "work2"), "--out", str(tmp_path / "other"), "--steps", "1",
                       "--init-from", str(out), "--attention-heads", "8,8,8")
    assert refused.returncode != 0 and "has 1,8,8" in refused.stderr, refused.stderr[-2000:]


def test_pooled_prompt_reaches_the_res_blocks_that_have_no_attention(tmp_path):
    tool = import_tool()
    out = tmp_path / "model"
    done = run_tool("--work", str(tmp_path / "work"), "--out", str(out), "--steps", "1", "--save-every", "1",
                    "--probe-every", "1000", "--pooled-prompt", "--text-encoder-from", str(embedded.EMBEDDED_MODEL_DIR))
    assert done.returncode == 0, done.stderr[-2000:]
    assert tool.exported_pooled_prompt(out) and not tool.exported_pooled_prompt(embedded.EMBEDDED_MODEL_DIR)
    from diffusers import UNet2DConditionModel

    def first_block(unet, context):
        """The 32x32 down block's output: res-blocks only, no attention, in either layout."""
        captured = {}

        def keep(module, args, output) -> None:
            captured["out"] = output[0]

        hook = unet.down_blocks[0].register_forward_hook(keep)
        torch.manual_seed(0)
        with torch.no_grad():
            unet(torch.randn(1, 3, 32, 32), torch.tensor([500]), context)
        hook.remove()
        return captured["out"]

    a, b = torch.randn(2, 1, 77, 128, generator=torch.Generator().manual_seed(1))
    pooled = UNet2DConditionModel.from_pretrained(out / "unet")
    assert (first_block(pooled, a) - first_block(pooled, b)).abs().max() > 1e-4
    shipped = UNet2DConditionModel.from_pretrained(embedded.EMBEDDED_MODEL_DIR / "unet")
    assert torch.equal(first_block(shipped, a), first_block(shipped, b))

    refused = run_tool("--work", str(tmp_path / "work"), "--out", str(tmp_path / "other"), "--steps", "1")
    assert refused.returncode != 0 and "--pooled-prompt" in refused.stderr, refused.stderr[-2000:]
